//! The `portwake` command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use portwake::config::{Config, ConfigError};
use portwake::daemon::Daemon;

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
    },
    /// Validate a config and let every plugin validate its options; exit 1 on any problem.
    Check {
        /// The host config (RON).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List the plugins found, with their ABI and plugin versions.
    Plugins {
        /// Search this directory first.
        #[arg(long)]
        plugin_dir: Option<PathBuf>,
    },
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
        } => {
            init_logging(log_level, log_format);
            match run(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("portwake: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => {
            let problems = portwake::check::check(&config);
            for p in &problems {
                println!("{p}");
            }
            if problems.is_empty() {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
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

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let config = match Config::load(path) {
        Ok(c) => c,
        // Every problem on a line of its own, as `check` prints them.
        Err(e @ ConfigError::Invalid { .. }) => anyhow::bail!("invalid config:\n{e}"),
        Err(e) => return Err(e.into()),
    };
    let daemon = Daemon::new(&config).context("cannot start")?;
    daemon.run()?;
    Ok(())
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
