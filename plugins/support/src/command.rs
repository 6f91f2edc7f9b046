use std::ffi::OsStr;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// What a finished command printed and how it exited.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// `true` when it exited with status 0.
    pub success: bool,
    /// Its standard output, lossily decoded.
    pub stdout: String,
    /// Its standard error, lossily decoded.
    pub stderr: String,
}

impl CommandOutput {
    /// `Ok(stdout)` on success, else an error naming the command and its stderr.
    pub fn into_result(self, what: &str) -> Result<String, String> {
        if self.success {
            Ok(self.stdout)
        } else {
            let detail = if self.stderr.trim().is_empty() {
                self.stdout.trim().to_owned()
            } else {
                self.stderr.trim().to_owned()
            };
            Err(format!("{what} failed: {detail}"))
        }
    }
}

/// Runs `argv` with stdin from /dev/null and captured output; kills it (SIGKILL)
/// when it has not finished after `timeout`.
pub fn run<S: AsRef<OsStr>>(argv: &[S], timeout: Duration) -> Result<CommandOutput, String> {
    let (program, args) = argv.split_first().ok_or("empty command")?;
    let name = program.as_ref().to_string_lossy().into_owned();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{name}: {e}"))?;
    let pid = i32::try_from(child.id()).map_err(|e| format!("{name}: pid: {e}"))?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("run-{name}"))
        .spawn(move || {
            let err_reader = std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(e) = stderr.as_mut() {
                    let _ = e.read_to_end(&mut buf);
                }
                buf
            });
            let mut out = Vec::new();
            if let Some(o) = stdout.as_mut() {
                let _ = o.read_to_end(&mut out);
            }
            let err = err_reader.join().unwrap_or_default();
            let status = child.wait();
            let _ = tx.send((status, out, err));
        })
        .map_err(|e| format!("{name}: spawning a reader thread: {e}"))?;
    let (status, out, err) = match rx.recv_timeout(timeout) {
        Ok(done) => done,
        Err(_) => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(format!("{name} did not finish within {timeout:?}; killed"));
        }
    };
    let status = status.map_err(|e| format!("{name}: wait: {e}"))?;
    Ok(CommandOutput {
        success: status.success(),
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    })
}
