//! `%` specifiers in socket-unit values (systemd.unit(5), "Specifiers").
//!
//! systemd expands them in `Listen*=`, `Service=` and `FileDescriptorName=` before parsing, so
//! `ListenStream=%t/x.sock` is `/run/x.sock`. Only the specifiers whose value for the system
//! manager is fixed or follows from the unit name are expanded; the rest (hostname, machine ID,
//! boot ID, os-release fields, ...) are known only inside the running guest and are reported.

/// Expands the specifiers of `value` for the non-template unit `unit` (e.g. `foo-bar.socket`).
/// Returns the offending character for a specifier that cannot be resolved here, `None` for a
/// trailing lone `%`.
pub(crate) fn expand(value: &str, unit: &str) -> Result<String, Option<char>> {
    let stem = unit.rsplit_once('.').map_or(unit, |(stem, _)| stem);
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            return Err(None);
        };
        match spec {
            '%' => out.push('%'),
            'n' => out.push_str(unit),
            'N' | 'p' => out.push_str(stem),
            // A non-template unit has an empty instance.
            'i' | 'I' => {}
            'j' | 'J' => out.push_str(stem.rsplit_once('-').map_or(stem, |(_, last)| last)),
            't' => out.push_str("/run"),
            'S' => out.push_str("/var/lib"),
            'C' => out.push_str("/var/cache"),
            'L' => out.push_str("/var/log"),
            'E' => out.push_str("/etc"),
            'T' => out.push_str("/tmp"),
            'V' => out.push_str("/var/tmp"),
            'h' => out.push_str("/root"),
            'u' | 'g' => out.push_str("root"),
            'U' | 'G' => out.push('0'),
            other => return Err(Some(other)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn expands_fixed_and_name_specifiers() {
        assert_eq!(
            expand("%t/%N.sock", "foo-bar.socket").unwrap(),
            "/run/foo-bar.sock"
        );
        assert_eq!(
            expand("%n:%p:%j:%i", "foo-bar.socket").unwrap(),
            "foo-bar.socket:foo-bar:bar:"
        );
        assert_eq!(
            expand("[fe80::1]:80%%eth0", "x.socket").unwrap(),
            "[fe80::1]:80%eth0"
        );
    }

    #[test]
    fn refuses_guest_only_and_dangling_specifiers() {
        assert_eq!(expand("%H", "x.socket"), Err(Some('H')));
        assert_eq!(expand("50%", "x.socket"), Err(None));
    }
}
