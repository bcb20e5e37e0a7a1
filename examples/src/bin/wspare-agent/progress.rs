//! A progress bar for initial syncs, drawn on stderr when it is a
//! terminal (and only then: logs to a file or the journal stay clean).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use wspare_core::{PairId, Progress};

use crate::replication::Directed;

/// `[#########-----------]  45%  7.2 MiB / 16.0 MiB  3.1 MiB/s  web`
pub(crate) fn bar(pair: &PairId, p: &Progress) -> String {
    const WIDTH: u64 = 30;
    let total = p.bytes_total.max(1);
    let done = p.bytes_done.min(total);
    let filled = done * WIDTH / total;
    let pct = done * 100 / total;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    format!(
        "[{}{}] {pct:>3}%  {:.1} MiB / {:.1} MiB  {:.1} MiB/s  initial sync of {pair}",
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize),
        mib(done),
        mib(p.bytes_total),
        mib(p.bytes_per_sec),
    )
}

/// Draws the bars of running initial syncs until aborted; does nothing
/// unless stderr is a terminal.
pub(crate) async fn run(replicators: Vec<Arc<Directed>>) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    let mut drawn = false;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut line = None;
        for r in &replicators {
            if let Some(p) = r.initial_progress().await {
                line = Some(bar(r.pair(), &p));
                break;
            }
        }
        let mut err = std::io::stderr().lock();
        match line {
            Some(l) => {
                let _ = write!(err, "\r\x1b[2K{l}");
                drawn = true;
            }
            None if drawn => {
                let _ = writeln!(err, "\r\x1b[2Kinitial sync done");
                drawn = false;
            }
            None => {}
        }
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_shape() {
        let p = Progress {
            bytes_done: 8 << 20,
            bytes_total: 16 << 20,
            bytes_per_sec: 3 << 20,
        };
        let s = bar(&PairId::new("web").unwrap(), &p);
        assert!(
            s.starts_with("[###############---------------]  50%  8.0 MiB / 16.0 MiB  3.0 MiB/s"),
            "{s}"
        );
        let zero = Progress {
            bytes_done: 0,
            bytes_total: 0,
            bytes_per_sec: 0,
        };
        assert!(bar(&PairId::new("web").unwrap(), &zero).contains("  0%"));
    }
}
