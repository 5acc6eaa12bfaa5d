//! What the soak counted and what went wrong, shared by every task.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

/// Counters by name and the failures (every one counts; the first 50 are kept verbatim, with
/// the second of the run they happened at). std Mutexes: never held across .await.
pub struct Report {
    started: Instant,
    counters: Mutex<BTreeMap<String, u64>>,
    failures: Mutex<(u64, Vec<String>)>,
}

impl Default for Report {
    fn default() -> Report {
        Report {
            started: Instant::now(),
            counters: Mutex::default(),
            failures: Mutex::default(),
        }
    }
}

impl Report {
    /// When the run started: the origin of every time the soak prints.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Seconds since the run started.
    pub fn secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn count(&self, name: &str) {
        self.add(name, 1);
    }

    pub fn add(&self, name: &str, n: u64) {
        *self
            .counters
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default() += n;
    }

    pub fn get(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    /// A broken promise: the run fails.
    pub fn fail(&self, what: String) {
        let what = format!("at {:.1} s: {what}", self.secs());
        eprintln!("soak: FAIL {what}");
        let mut failures = self.failures.lock().unwrap();
        failures.0 += 1;
        if failures.1.len() < 50 {
            failures.1.push(what);
        }
    }

    pub fn failures(&self) -> (u64, Vec<String>) {
        self.failures.lock().unwrap().clone()
    }

    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.counters.lock().unwrap().clone()
    }
}
