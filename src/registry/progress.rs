//! Progress on stderr for work that takes more than a moment (`dsv3 check` at V3 sizes).
//!
//! Nothing is printed when stderr is not a terminal (CI logs, pipes, tests) or when
//! `DSV3_NO_PROGRESS` is set, and nothing for work that ends within [`DELAY`]: after it, one
//! line `LABEL: PHASE… 5 s` is rewritten in place every half second and erased at the end.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long work runs before its progress line appears.
pub const DELAY: Duration = Duration::from_secs(2);

/// A progress line for one piece of work; dropping it stops and erases the line.
pub struct Progress {
    phase: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Start reporting `label` (silent unless stderr is a terminal).
    pub fn start(label: &str) -> Self {
        let phase = Arc::new(Mutex::new(String::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let enabled =
            std::io::stderr().is_terminal() && std::env::var_os("DSV3_NO_PROGRESS").is_none();
        let thread = enabled.then(|| {
            let (phase, stop, label) = (phase.clone(), stop.clone(), label.to_string());
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut shown = false;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    let t = start.elapsed();
                    if t < DELAY || (t.as_millis() / 100) % 5 != 0 {
                        continue;
                    }
                    let p = phase.lock().map(|p| p.clone()).unwrap_or_default();
                    let _ = write!(std::io::stderr(), "\r\x1b[K{}", line(&label, &p, t));
                    shown = true;
                }
                if shown {
                    let _ = write!(std::io::stderr(), "\r\x1b[K");
                }
            })
        });
        Progress {
            phase,
            stop,
            thread,
        }
    }

    /// Name the current phase (`running the reference`, `comparing`).
    pub fn phase(&self, p: &str) {
        if let Ok(mut g) = self.phase.lock() {
            *g = p.to_string();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `dsv3 check fp8_gemm: running the reference… 12 s`.
fn line(label: &str, phase: &str, t: Duration) -> String {
    if phase.is_empty() {
        format!("{label}… {} s", t.as_secs())
    } else {
        format!("{label}: {phase}… {} s", t.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_label_phase_and_seconds() {
        assert_eq!(
            line(
                "dsv3 check fp8_gemm",
                "comparing",
                Duration::from_millis(12_400)
            ),
            "dsv3 check fp8_gemm: comparing… 12 s"
        );
        assert_eq!(line("x", "", Duration::from_secs(3)), "x… 3 s");
    }

    #[test]
    fn silent_and_prompt_when_stderr_is_not_a_terminal() {
        // under `cargo test` stderr is captured (not a terminal): no thread, dropping at once
        let p = Progress::start("test");
        p.phase("phase");
        assert!(p.thread.is_none() || std::io::stderr().is_terminal());
    }
}
