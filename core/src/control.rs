//! The control socket: a unix stream socket (mode 0600) over which `portwake status`,
//! `start`, `stop`, `reload` and `restart` talk to a running daemon, one JSON request
//! line and one JSON reply line per connection.
//!
//! The daemon side accepts on a thread of its own and hands each request to the
//! event loop, which alone owns the units; peers other than root and the daemon's
//! own user are refused before a byte is read.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

/// How long a client may take to send its request, and the daemon to answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Every unit's state, listeners and counters.
    Status,
    /// Metrics in Prometheus' text exposition format.
    Metrics,
    /// Start a unit's guest now (also ends a hold).
    Start {
        /// The unit.
        unit: String,
    },
    /// Stop a unit's guest; with `hold`, keep the unit stopped and not listening.
    Stop {
        /// The unit.
        unit: String,
        /// Keep it stopped until `start`.
        #[serde(default)]
        hold: bool,
    },
    /// Re-read the config file and apply the difference.
    Reload,
    /// Exec a fresh portwake that takes over every listener and running guest.
    Restart,
}

/// The default control socket: under /run for root, the runtime directory otherwise.
pub fn default_path() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/portwake/control.sock");
    }
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("portwake-{}", nix::unistd::geteuid()))
        });
    base.join("portwake/control.sock")
}

/// Why the control socket could not be served or reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another daemon answers on the socket.
    #[error("{}: another portwake is running (its control socket answers)", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Nothing answers on the socket.
    #[error("portwake is not running (nothing answers on {})", path.display())]
    NotRunning {
        /// The socket path.
        path: PathBuf,
    },
    /// The daemon refused this user.
    #[error("{}: permission denied: run as root or as the daemon's user", path.display())]
    Refused {
        /// The socket path.
        path: PathBuf,
    },
    /// Any other I/O problem.
    #[error("{}: {step}: {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The daemon's answer was not JSON.
    #[error("{}: unreadable reply {reply:?}", path.display())]
    Reply {
        /// The socket path.
        path: PathBuf,
        /// What came back.
        reply: String,
    },
}

/// A request waiting for the event loop, with the way back to its client.
#[derive(Debug)]
pub struct Pending {
    /// What the client asked.
    pub request: Request,
    /// Where the loop sends the reply.
    pub reply: mpsc::Sender<serde_json::Value>,
    /// Signalled once the reply is written to the client (a live restart waits for
    /// it: an exec would otherwise end the control thread mid-reply).
    pub written: mpsc::Receiver<()>,
}

/// Binds the control socket (replacing a stale one) and serves it on a thread;
/// each request goes to `deliver`, which must pass it on to the event loop.
pub fn serve(path: &Path, deliver: impl Fn(Pending) + Send + 'static) -> Result<(), ControlError> {
    let io = |step: &'static str| {
        let path = path.to_owned();
        move |source| ControlError::Io { path, step, source }
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io("creating its directory"))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
    }
    let listener = UnixListener::bind(path).map_err(io("bind"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io("chmod"))?;
    let own_uid = nix::unistd::geteuid().as_raw();
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => handle(stream, own_uid, &deliver),
                    Err(e) => {
                        warn!(error = %e, "control socket accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map_err(io("spawning its thread"))?;
    Ok(())
}

fn handle(stream: UnixStream, own_uid: u32, deliver: &impl Fn(Pending)) {
    let reply = |mut stream: &UnixStream, value: serde_json::Value| {
        let _ = writeln!(stream, "{value}");
    };
    // Read the request before judging the peer, so a refused client reads the
    // refusal instead of a broken pipe.
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return;
    }
    match getsockopt(&stream, PeerCredentials) {
        Ok(cred) if cred.uid() == 0 || cred.uid() == own_uid => {}
        Ok(cred) => {
            warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "control request refused: not root or the daemon's user"
            );
            reply(&stream, error_reply("permission denied"));
            return;
        }
        Err(e) => {
            warn!(error = %e, "control request refused: no peer credentials");
            return;
        }
    }
    let request = match serde_json::from_str::<Request>(&line) {
        Ok(r) => r,
        Err(e) => {
            reply(&stream, error_reply(&format!("bad request: {e}")));
            return;
        }
    };
    debug!(?request, "control request");
    let (tx, rx) = mpsc::channel();
    let (written_tx, written) = mpsc::channel();
    deliver(Pending {
        request,
        reply: tx,
        written,
    });
    let answer = rx
        .recv_timeout(REPLY_TIMEOUT)
        .unwrap_or_else(|_| error_reply("the daemon did not answer in time"));
    reply(&stream, answer);
    let _ = written_tx.send(());
}

/// `{"ok": false, "error": message}`.
pub fn error_reply(message: &str) -> serde_json::Value {
    serde_json::json!({ "ok": false, "error": message })
}

/// Sends one request to the daemon at `path` and returns its reply.
pub fn request(path: &Path, request: &Request) -> Result<serde_json::Value, ControlError> {
    let mut stream = UnixStream::connect(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ControlError::NotRunning {
                path: path.to_owned(),
            }
        }
        std::io::ErrorKind::PermissionDenied => ControlError::Refused {
            path: path.to_owned(),
        },
        _ => ControlError::Io {
            path: path.to_owned(),
            step: "connect",
            source,
        },
    })?;
    let io = |step: &'static str| {
        move |source| ControlError::Io {
            path: path.to_owned(),
            step,
            source,
        }
    };
    let line = serde_json::to_string(request).expect("requests serialize");
    writeln!(stream, "{line}").map_err(io("send"))?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT + REQUEST_TIMEOUT))
        .map_err(io("set timeout"))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(io("receive"))?;
    let value: serde_json::Value =
        serde_json::from_str(&reply).map_err(|_| ControlError::Reply {
            path: path.to_owned(),
            reply: reply.clone(),
        })?;
    if value["error"] == "permission denied" {
        return Err(ControlError::Refused {
            path: path.to_owned(),
        });
    }
    Ok(value)
}
