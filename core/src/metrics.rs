//! Prometheus text exposition of the units' counters.

use std::fmt::Write;

use crate::unit::{Histogram, State, Unit};

/// A counter: name, help text, and how to read it off a unit.
type Counter = (&'static str, &'static str, fn(&Unit) -> u64);

/// A histogram: name, help text, and which of a unit's histograms it is.
type HistogramOf = (&'static str, &'static str, fn(&Unit) -> &Histogram);

/// Renders every metric for `units`.
pub fn render<'a>(units: impl Iterator<Item = &'a Unit> + Clone) -> String {
    let mut out = String::new();
    let counters: [Counter; 4] = [
        ("portwake_activations_total", "Guest starts begun.", |u| {
            u.stats.activations
        }),
        (
            "portwake_activation_failures_total",
            "Guest starts that failed.",
            |u| u.stats.failures,
        ),
        (
            "portwake_backoffs_total",
            "Backoffs entered after a start loop or failure.",
            |u| u.stats.backoffs,
        ),
        (
            "portwake_idle_stops_total",
            "Guests stopped for being idle.",
            |u| u.stats.idle_stops,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for unit in units.clone() {
            let _ = writeln!(
                out,
                "{name}{{unit=\"{}\"}} {}",
                unit.config.name,
                value(unit)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP portwake_unit_running Whether the unit's guest runs.\n# TYPE portwake_unit_running gauge"
    );
    for unit in units.clone() {
        let running = u8::from(matches!(unit.state, State::Running { .. }));
        let _ = writeln!(
            out,
            "portwake_unit_running{{unit=\"{}\"}} {running}",
            unit.config.name
        );
    }
    let histograms: [HistogramOf; 2] = [
        (
            "portwake_activation_seconds",
            "Time from the first client to the plugin reporting the guest started.",
            |u| &u.stats.latency,
        ),
        (
            "portwake_dispatch_seconds",
            "Time from the event loop waking for a waiting client to the plugin call beginning.",
            |u| &u.stats.dispatch,
        ),
    ];
    for (name, help, histogram) in histograms {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for unit in units.clone() {
            let label = &unit.config.name;
            let h = histogram(unit);
            let mut cumulative = 0;
            for (bound, count) in h.bounds.iter().zip(&h.counts) {
                cumulative += count;
                let _ = writeln!(
                    out,
                    "{name}_bucket{{unit=\"{label}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{unit=\"{label}\",le=\"+Inf\"}} {}\n{name}_sum{{unit=\"{label}\"}} {}\n{name}_count{{unit=\"{label}\"}} {}",
                h.count, h.sum, h.count
            );
        }
    }
    out
}
