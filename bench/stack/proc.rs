//! /proc readers: CPU time and memory of a process (the relay, pg_recvlogical, the
//! bench itself). Linux only, and a missing process reads as None rather than an
//! error, because a measured process may exit between two samples.

pub(crate) fn proc_cpu_secs(pid: u32, clk_tck: f64) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // fields after "pid (comm) ": state is [0], utime is field 14 overall -> [11], stime [12]
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / clk_tck)
}

/// Whether the process has exited (a zombie not yet reaped still has its CPU times
/// in /proc, which are read before it is reaped).
pub(crate) fn proc_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s.get(i + 2..i + 3))
            .is_none_or(|st| st == "Z" || st == "X"),
        Err(_) => true,
    }
}

pub(crate) fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Jiffies of the whole machine from /proc/stat: (busy, total), all cores.
fn machine_jiffies() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    // idle and iowait
    let idle = f.get(3)? + f.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// The pids of the stack's Kafka nodes (scripts/stack writes node*/pid under
/// OUTBOX_RELAY_KAFKA_DIR), for the CPU split.
pub(crate) fn broker_pids() -> Vec<u32> {
    let Ok(dir) = std::env::var("OUTBOX_RELAY_KAFKA_DIR") else {
        return Vec::new();
    };
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("node"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("pid")).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// CPU time of named processes over an interval, and of the machine as a whole:
/// which process takes the cores when a publisher is slower than a baseline.
pub(crate) struct CpuSplit {
    clk_tck: f64,
    t0: std::time::Instant,
    machine0: Option<(u64, u64)>,
    procs: Vec<(String, Vec<u32>, f64)>,
}

impl CpuSplit {
    pub(crate) fn start(clk_tck: f64) -> CpuSplit {
        CpuSplit {
            clk_tck,
            t0: std::time::Instant::now(),
            machine0: machine_jiffies(),
            procs: Vec::new(),
        }
    }

    /// Adds a process group to watch from now on (a walsender appears only once its
    /// reader connected, so processes may join after the start).
    pub(crate) fn watch(&mut self, name: &str, pids: Vec<u32>) {
        let cpu0 = pids
            .iter()
            .filter_map(|p| proc_cpu_secs(*p, self.clk_tck))
            .sum();
        self.procs.push((name.to_string(), pids, cpu0));
    }

    pub(crate) fn watching(&self, name: &str) -> bool {
        self.procs.iter().any(|p| p.0 == name)
    }

    /// {"wall_s", "machine_busy_cores", "<name>_cores", "<name>_cpu_s"}: cores = CPU
    /// seconds / wall seconds.
    pub(crate) fn finish(&self) -> serde_json::Value {
        let wall = self.t0.elapsed().as_secs_f64();
        let mut out = serde_json::json!({ "wall_s": wall });
        if let (Some((b0, t0)), Some((b1, t1))) = (self.machine0, machine_jiffies()) {
            let cores = std::thread::available_parallelism()
                .map(|n| n.get() as f64)
                .unwrap_or(1.0);
            if t1 > t0 {
                out["machine_busy_cores"] =
                    serde_json::json!((b1 - b0) as f64 / (t1 - t0) as f64 * cores);
            }
        }
        for (name, pids, cpu0) in &self.procs {
            let cpu: f64 = pids
                .iter()
                .filter_map(|p| proc_cpu_secs(*p, self.clk_tck))
                .sum::<f64>()
                - cpu0;
            out[format!("{name}_cpu_s")] = serde_json::json!(cpu);
            out[format!("{name}_cores")] = serde_json::json!(cpu / wall);
        }
        out
    }
}

/// The last `n` lines of a log file (empty when it cannot be read), for the error
/// of a child process that exited.
pub(crate) fn log_tail(path: &std::path::Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
