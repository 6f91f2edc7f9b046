//! `portwake check`: everything `run` would refuse, found without binding a socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use portwake_plugin_api::GuestExit;

use crate::config::{Config, ConfigError};
use crate::guest_match;
use crate::plugin_host::{self, HostEvents, PluginError, PluginInstance, PluginLibrary};

/// Plugin callbacks during `check`: nothing is started, so nothing is reported.
struct Silent;

impl HostEvents for Silent {
    fn log(&self, _level: u32, _message: &str) {}
    fn guest_stopped(&self, _guest: u64, _exit: GuestExit) {}
}

/// What `check` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// One line per problem; any problem makes `check` exit 1.
    pub problems: Vec<String>,
    /// Things worth knowing that are not problems.
    pub notes: Vec<String>,
}

/// Checks a config file: syntax, values, plugins and their options, and listeners
/// against guest socket units.
pub fn check(path: &Path) -> CheckReport {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(ConfigError::Invalid { problems }) => {
            return CheckReport {
                problems: problems.iter().map(ToString::to_string).collect(),
                notes: Vec::new(),
            }
        }
        Err(e) => {
            return CheckReport {
                problems: vec![e.to_string()],
                notes: Vec::new(),
            }
        }
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let base = path.parent().unwrap_or(Path::new("."));
    let dirs = plugin_host::search_dirs(config.plugin_dir.as_deref());
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    for unit in &config.units {
        if unit.guest_units.is_some() {
            let plan = guest_match::plan(path, unit);
            problems.extend(plan.problems);
            notes.extend(plan.notes);
        }
        let at = format!("{}: unit {:?}", path.display(), unit.name);
        let library = match plugin_host::resolve(&unit.plugin, base, &dirs)
            .and_then(|p| PluginLibrary::load_with(&p, config.allow_untrusted_plugins))
        {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!("{at}: plugin: {e}"));
                continue;
            }
        };
        match PluginInstance::create(library, &unit.options, Arc::new(Silent)) {
            Ok(instance) => drop(instance),
            Err(PluginError::Options(message)) => {
                problems.push(options_problem(
                    path,
                    &text,
                    &unit.name,
                    &unit.options,
                    &message,
                ));
            }
            Err(e) => problems.push(format!("{at}: plugin: {e}")),
        }
    }
    CheckReport { problems, notes }
}

/// Places an options error in the config file when the plugin gave a position
/// within its options text (`options LINE:COL: …`, as the SDK's parser does).
fn options_problem(path: &Path, text: &str, unit: &str, options: &str, message: &str) -> String {
    let located = message
        .strip_prefix("options ")
        .and_then(|rest| {
            let (pos, what) = rest.split_once(": ")?;
            let (line, col) = pos.split_once(':')?;
            Some((
                line.parse::<usize>().ok()?,
                col.parse::<usize>().ok()?,
                what,
            ))
        })
        .and_then(|(line, col, what)| {
            let start = text.find(options)?;
            let before = &text[..start];
            let base_line = before.matches('\n').count() + 1;
            let base_col = start - before.rfind('\n').map_or(0, |nl| nl + 1) + 1;
            let col = if line == 1 { base_col + col - 1 } else { col };
            Some(format!(
                "{}:{}:{col}: unit {unit:?}: options: {what}",
                path.display(),
                base_line + line - 1
            ))
        });
    located.unwrap_or_else(|| format!("{}: unit {unit:?}: {message}", path.display()))
}

/// One line per plugin found in the search directories.
pub fn list_plugins(plugin_dir: Option<PathBuf>) -> Vec<String> {
    let mut lines = Vec::new();
    for dir in plugin_host::search_dirs(plugin_dir.as_deref()) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libportwake_") && n.ends_with(".so"))
            })
            .collect();
        files.sort();
        for file in files {
            lines.push(match PluginLibrary::load(&file) {
                Ok(l) => format!(
                    "{:<12} {:<8} ABI {:<5} {}",
                    l.name(),
                    l.version(),
                    l.abi(),
                    l.path().display()
                ),
                Err(e) => format!("{:<12} {:<8} {:<9} {e}", "?", "?", "unusable"),
            });
        }
    }
    lines
}
