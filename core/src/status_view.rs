//! `portwake status` for people: one line per unit, one per listener.

use std::fmt::Write;

/// Renders the daemon's status reply as a table.
pub fn render(reply: &serde_json::Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<10} {:>8} {:>8} {:>11} LAST FAILURE",
        "UNIT", "STATE", "FOR", "PID", "ACTIVATIONS"
    );
    let empty = Vec::new();
    for unit in reply["units"].as_array().unwrap_or(&empty) {
        let pid = unit["pid"]
            .as_i64()
            .map_or_else(|| "-".to_owned(), |p| p.to_string());
        let failure = unit["last_failure"]["error"].as_str().unwrap_or("-");
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>7}s {:>8} {:>11} {failure}",
            unit["name"].as_str().unwrap_or("?"),
            unit["state"].as_str().unwrap_or("?"),
            unit["for_secs"].as_u64().unwrap_or(0),
            pid,
            unit["activations"].as_u64().unwrap_or(0),
        );
        for l in unit["listeners"].as_array().unwrap_or(&empty) {
            let queued = l["queued"]
                .as_u64()
                .map_or_else(String::new, |q| format!(", {q} waiting"));
            let _ = writeln!(
                out,
                "  fd {} {} {} ({}{queued})",
                l["fd"],
                l["kind"].as_str().unwrap_or("?"),
                l["address"].as_str().unwrap_or("?"),
                l["name"].as_str().unwrap_or("?"),
            );
        }
    }
    out
}
