//! The `portwake` command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use portwake::config::{Config, ConfigError};
use portwake::control::Request;
use portwake::daemon::{Daemon, RunOptions};

/// Socket activation of whole containers.
#[derive(Debug, Parser)]
#[command(name = "portwake", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon in the foreground; logs go to stderr.
    Run {
        /// The host config (RON).
        #[arg(long, short)]
        config: PathBuf,
        /// Least important log level shown.
        #[arg(long, default_value = "info")]
        log_level: tracing::Level,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
        /// Control socket (overrides the config's `control_socket`).
        #[arg(long)]
        control_socket: Option<PathBuf>,
    },
    /// Show every unit's state, guest, counters and listeners.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the daemon's JSON.
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// Print metrics in Prometheus' text format.
        #[arg(long)]
        prometheus: bool,
    },
    /// Start a unit's guest now (also ends a hold).
    Start {
        #[command(flatten)]
        target: Target,
        /// The unit.
        unit: String,
    },
    /// Stop a unit's guest; it listens again unless --hold.
    Stop {
        #[command(flatten)]
        target: Target,
        /// Keep the unit stopped and not listening until `portwake start`.
        #[arg(long)]
        hold: bool,
        /// The unit.
        unit: String,
    },
    /// Re-read the config and apply the difference (as SIGHUP does).
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Exec a fresh portwake (an upgraded binary, say) that takes over every
    /// listener and running guest, without refusing a client; waits until it answers.
    Restart {
        #[command(flatten)]
        target: Target,
    },
    /// Validate a config and let every plugin validate its options; exit 1 on any problem.
    Check {
        /// The host config (RON).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a host config unit derived from a guest's enabled socket units.
    Generate {
        /// The guest's root directory, or a unit directory.
        #[arg(long)]
        guest_units: PathBuf,
        /// The unit's name (default: the guest directory's name).
        #[arg(long)]
        name: Option<String>,
        /// The plugin that starts the guest.
        #[arg(long, default_value = "nspawn")]
        plugin: String,
        /// The guest has no IPv6: a bare port means 0.0.0.0:PORT to it.
        #[arg(long)]
        no_ipv6: bool,
    },
    /// List the plugins found, with their ABI and plugin versions.
    Plugins {
        /// Search this directory first.
        #[arg(long)]
        plugin_dir: Option<PathBuf>,
    },
}

/// Which daemon a control command talks to.
#[derive(Debug, clap::Args)]
struct Target {
    /// The daemon's control socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Find the control socket in this config.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        if let Some(config) = &self.config {
            let config = Config::load(config)?;
            if let Some(socket) = config.control_socket {
                return Ok(socket);
            }
        }
        Ok(portwake::control::default_path())
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per event.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            log_level,
            log_format,
            control_socket,
        } => {
            init_logging(log_level, log_format);
            match run(&config, &RunOptions { control_socket }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("portwake: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status {
            target,
            json,
            prometheus,
        } => control(
            &target,
            &if prometheus {
                Request::Metrics
            } else {
                Request::Status
            },
            |reply| {
                if prometheus {
                    print!("{}", reply["text"].as_str().unwrap_or_default());
                } else if json {
                    println!("{reply:#}");
                } else {
                    print!("{}", portwake::status_view::render(reply));
                }
            },
        ),
        Command::Start { target, unit } => control(&target, &Request::Start { unit }, |reply| {
            println!(
                "{}: {}",
                reply["unit"].as_str().unwrap_or("?"),
                reply["state"].as_str().unwrap_or("?")
            );
        }),
        Command::Stop { target, hold, unit } => {
            control(&target, &Request::Stop { unit, hold }, |reply| {
                println!(
                    "{}: {}",
                    reply["unit"].as_str().unwrap_or("?"),
                    reply["state"].as_str().unwrap_or("?")
                );
            })
        }
        Command::Reload { target } => control(&target, &Request::Reload, |reply| {
            println!(
                "reloaded: {}",
                reply["summary"].as_str().unwrap_or_default()
            );
        }),
        Command::Restart { target } => restart(&target),
        Command::Check { config } => {
            let report = portwake::check::check(&config);
            for p in &report.problems {
                println!("{p}");
            }
            for n in &report.notes {
                println!("note: {n}");
            }
            if report.problems.is_empty() {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Generate {
            guest_units,
            name,
            plugin,
            no_ipv6,
        } => {
            let name = name.unwrap_or_else(|| default_unit_name(&guest_units));
            match portwake::guest_match::generate(&guest_units, &name, &plugin, !no_ipv6) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("portwake: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Plugins { plugin_dir } => {
            let lines = portwake::check::list_plugins(plugin_dir);
            if lines.is_empty() {
                eprintln!("portwake: no plugins found");
                return ExitCode::FAILURE;
            }
            for line in lines {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
    }
}

/// Sends one control request and prints the reply with `show`; exit 1 on any error.
fn control(target: &Target, request: &Request, show: impl FnOnce(&serde_json::Value)) -> ExitCode {
    let reply = target
        .socket()
        .and_then(|socket| Ok(portwake::control::request(&socket, request)?));
    match reply {
        Ok(reply) if reply["ok"] == true => {
            show(&reply);
            ExitCode::SUCCESS
        }
        Ok(reply) => {
            eprintln!(
                "portwake: {}",
                reply["error"].as_str().unwrap_or("the daemon refused")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("portwake: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Asks for a live restart and waits until the new image answers.
fn restart(target: &Target) -> ExitCode {
    let started = std::time::Instant::now();
    let result = (|| -> anyhow::Result<String> {
        let socket = target.socket()?;
        let reply = portwake::control::request(&socket, &Request::Restart)?;
        if reply["ok"] != true {
            anyhow::bail!(
                "{}",
                reply["error"].as_str().unwrap_or("the daemon refused")
            );
        }
        let old = reply["instance"].clone();
        let deadline = started + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if let Ok(status) = portwake::control::request(&socket, &Request::Status) {
                if status["ok"] == true && status["instance"] != old {
                    return Ok(format!(
                        "restarted in {} ms (pid {})",
                        started.elapsed().as_millis(),
                        status["pid"]
                    ));
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        anyhow::bail!("the daemon did not come back within 60 s")
    })();
    match result {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("portwake: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path, options: &RunOptions) -> anyhow::Result<()> {
    let config = match Config::load(path) {
        Ok(c) => c,
        // Every problem on a line of its own, as `check` prints them.
        Err(e @ ConfigError::Invalid { .. }) => anyhow::bail!("invalid config:\n{e}"),
        Err(e) => return Err(e.into()),
    };
    let daemon = Daemon::new(&config, options).context("cannot start")?;
    daemon.run()?;
    Ok(())
}

/// The guest root's directory name, skipping a trailing `etc/systemd/system`.
fn default_unit_name(guest_units: &std::path::Path) -> String {
    guest_units
        .ancestors()
        .filter_map(|p| p.file_name()?.to_str())
        .find(|n| !["system", "systemd", "etc", "lib", "usr", "local", "run"].contains(n))
        .filter(|n| {
            n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.@-".contains(&b))
        })
        .unwrap_or("guest")
        .to_owned()
}

fn init_logging(level: tracing::Level, format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
