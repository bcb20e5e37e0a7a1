//! Pure parsers for what rsync prints: `--info=progress2` meter lines, the
//! per-file line of our `--out-format`, `--stats` totals, and the checksum
//! lines of a dry run. Text in, typed values out; no I/O. Tested on output
//! recorded from the real rsync (`testdata/`).
//!
//! Every rsync this crate runs gets `LC_ALL=C`, so numbers use `,` as the
//! thousands separator and `.` as the decimal point.

use wspare_core::Progress;

/// The prefix of the per-file line our `--out-format` produces:
/// `wspare-item:<checksum hex>:<length>:<name>`.
pub const ITEM_PREFIX: &str = "wspare-item:";

/// The `--out-format` value that produces [`ITEM_PREFIX`] lines. `%C` is
/// the sender's whole-file checksum of a transferred file, in the
/// algorithm chosen by `--checksum-choice`.
pub const OUT_FORMAT: &str = "wspare-item:%C:%l:%n";

/// One `--info=progress2` meter line:
/// `    575,012,864  53%  182.66MB/s    0:00:02  (xfr#1, to-chk=0/1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgressLine {
    /// Bytes of the transfer processed so far (matched and literal).
    pub bytes: u64,
    /// Percent of the total rsync knows of.
    pub percent: u8,
    /// Current rate in bytes per second (rsync's units are powers of 1024).
    pub bytes_per_sec: u64,
    /// The line ends a file (`xfr#N`).
    pub file_done: bool,
}

/// The per-file line of [`OUT_FORMAT`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemLine {
    /// Whole-file checksum, lower-case hex, as rsync printed it.
    pub checksum: String,
    /// File length in bytes.
    pub length: u64,
    /// Name as rsync shows it (relative to the transfer root).
    pub name: String,
}

/// One `--stats` total we use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatLine {
    /// `Literal data: N bytes`: bytes that were not found in the basis.
    Literal(u64),
    /// `Matched data: N bytes`: bytes reused from the basis.
    Matched(u64),
    /// `Total bytes sent: N`: what the client sent.
    Sent(u64),
    /// `Total bytes received: N`: what the client received.
    Received(u64),
}

/// One line of rsync's stdout, classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    /// A progress meter.
    Progress(ProgressLine),
    /// The per-file line.
    Item(ItemLine),
    /// A `--stats` total.
    Stat(StatLine),
    /// Anything else (other stats, blank, the summary).
    Other,
}

/// Parses a number as rsync prints it: digits with optional `,`
/// separators. `None` for anything else.
pub fn parse_count(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().next()?.is_ascii_digit() {
        return None;
    }
    let mut n: u64 = 0;
    for b in s.bytes() {
        match b {
            b',' => {}
            b'0'..=b'9' => n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?,
            _ => return None,
        }
    }
    Some(n)
}

/// Parses a rate such as `182.66MB/s`, `0.00kB/s` or `1.02GB/s` into bytes
/// per second (rsync's kB, MB, GB and TB are powers of 1024).
pub fn parse_rate(s: &str) -> Option<u64> {
    let s = s.strip_suffix("/s")?;
    let (num, mult) = if let Some(n) = s.strip_suffix("TB") {
        (n, 1u64 << 40)
    } else if let Some(n) = s.strip_suffix("GB") {
        (n, 1 << 30)
    } else if let Some(n) = s.strip_suffix("MB") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("kB") {
        (n, 1 << 10)
    } else if let Some(n) = s.strip_suffix('B') {
        (n, 1)
    } else {
        return None;
    };
    // Fixed point with up to two decimals, no floats.
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if frac.len() > 2 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int = parse_count(int)?;
    let mut hundredths = 0u64;
    for (i, b) in frac.bytes().enumerate() {
        hundredths += u64::from(b - b'0') * if i == 0 { 10 } else { 1 };
    }
    let whole = int.checked_mul(mult)?;
    Some(whole + hundredths * mult / 100)
}

fn parse_progress(line: &str) -> Option<ProgressLine> {
    let mut w = line.split_whitespace();
    let bytes = parse_count(w.next()?)?;
    let pct = w.next()?.strip_suffix('%')?;
    let percent: u8 = pct.parse().ok().filter(|p| *p <= 100)?;
    let bytes_per_sec = parse_rate(w.next()?)?;
    let eta = w.next()?;
    if !eta.contains(':') || !eta.bytes().all(|b| b.is_ascii_digit() || b == b':') {
        return None;
    }
    let file_done = match w.next() {
        None => false,
        Some(x) if x.starts_with("(xfr#") => true,
        Some(_) => return None,
    };
    Some(ProgressLine {
        bytes,
        percent,
        bytes_per_sec,
        file_done,
    })
}

fn parse_item(line: &str) -> Option<ItemLine> {
    let rest = line.strip_prefix(ITEM_PREFIX)?;
    let mut parts = rest.splitn(3, ':');
    let checksum = parts.next()?;
    let length = parse_count(parts.next()?)?;
    let name = parts.next()?;
    if checksum.is_empty() || !checksum.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(ItemLine {
        checksum: checksum.to_ascii_lowercase(),
        length,
        name: name.to_string(),
    })
}

fn parse_stat(line: &str) -> Option<StatLine> {
    let (key, value) = line.split_once(": ")?;
    let value = value.trim().trim_end_matches(" bytes");
    let n = parse_count(value)?;
    match key.trim() {
        "Literal data" => Some(StatLine::Literal(n)),
        "Matched data" => Some(StatLine::Matched(n)),
        "Total bytes sent" => Some(StatLine::Sent(n)),
        "Total bytes received" => Some(StatLine::Received(n)),
        _ => None,
    }
}

/// Classifies one line of rsync's stdout (already split at `\r` and `\n`).
pub fn parse_line(line: &str) -> Line {
    if let Some(i) = parse_item(line) {
        return Line::Item(i);
    }
    if let Some(p) = parse_progress(line) {
        return Line::Progress(p);
    }
    if let Some(s) = parse_stat(line) {
        return Line::Stat(s);
    }
    Line::Other
}

/// What one rsync transfer of one file reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransferReport {
    /// The whole-file checksum of the file sent, if rsync printed it.
    pub checksum: Option<String>,
    /// Its length.
    pub length: Option<u64>,
    /// Literal bytes (not found in the basis).
    pub literal: u64,
    /// Bytes matched in the basis.
    pub matched: u64,
    /// Bytes the client sent.
    pub sent: u64,
    /// Bytes the client received.
    pub received: u64,
    /// The last progress line seen.
    pub last_progress: Option<ProgressLine>,
}

impl TransferReport {
    /// Folds one classified line in.
    pub fn feed(&mut self, line: &Line) {
        match line {
            Line::Progress(p) => self.last_progress = Some(*p),
            Line::Item(i) => {
                self.checksum = Some(i.checksum.clone());
                self.length = Some(i.length);
            }
            Line::Stat(StatLine::Literal(n)) => self.literal = *n,
            Line::Stat(StatLine::Matched(n)) => self.matched = *n,
            Line::Stat(StatLine::Sent(n)) => self.sent = *n,
            Line::Stat(StatLine::Received(n)) => self.received = *n,
            Line::Other => {}
        }
    }

    /// Parses a whole captured stdout (split at `\r` and `\n`).
    pub fn from_output(stdout: &str) -> Self {
        let mut r = TransferReport::default();
        for l in stdout.split(['\r', '\n']).filter(|l| !l.is_empty()) {
            r.feed(&parse_line(l));
        }
        r
    }
}

/// Progress of a cycle over several disks: `done_before` bytes of earlier
/// disks plus the current meter, out of `total`.
pub fn cycle_progress(done_before: u64, total: u64, line: &ProgressLine) -> Progress {
    Progress {
        bytes_done: done_before
            .saturating_add(line.bytes)
            .min(total.max(done_before)),
        bytes_total: total,
        bytes_per_sec: line.bytes_per_sec,
    }
}

/// The checksums of a dry run (`rsync -n -c --out-format=wspare-item:...`),
/// by name.
pub fn parse_checksums(stdout: &str) -> Vec<ItemLine> {
    stdout.split(['\r', '\n']).filter_map(parse_item).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL_DELTA: &str = include_str!("../testdata/progress2-local-delta.out");
    const SSH_FULL: &str = include_str!("../testdata/progress2-ssh-full.out");
    const KILLED: &str = include_str!("../testdata/killed.out");
    const MISSING: &str = include_str!("../testdata/missing-source.out");

    fn progress_lines(s: &str) -> Vec<ProgressLine> {
        s.split(['\r', '\n'])
            .filter_map(|l| match parse_line(l) {
                Line::Progress(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn numbers_and_rates() {
        assert_eq!(parse_count("1,073,741,824"), Some(1_073_741_824));
        assert_eq!(parse_count("0"), Some(0));
        assert_eq!(parse_count(""), None);
        assert_eq!(parse_count(",1"), None);
        assert_eq!(parse_count("12a"), None);
        assert_eq!(parse_count("99,999,999,999,999,999,999"), None);
        assert_eq!(parse_rate("0.00kB/s"), Some(0));
        assert_eq!(parse_rate("1.50kB/s"), Some(1536));
        assert_eq!(
            parse_rate("182.66MB/s"),
            Some(182 * 1048576 + 66 * 1048576 / 100)
        );
        assert_eq!(parse_rate("2.00GB/s"), Some(2 << 30));
        assert_eq!(parse_rate("7B/s"), Some(7));
        assert_eq!(parse_rate("1.234MB/s"), None);
        assert_eq!(parse_rate("fast"), None);
    }

    /// Recorded: a local delta transfer of a 1 GiB image with 1 % of its
    /// blocks rewritten, `--info=progress2 --stats --out-format=...`.
    #[test]
    fn recorded_local_delta_transfer() {
        let p = progress_lines(LOCAL_DELTA);
        assert_eq!(p.len(), 10, "{p:?}");
        assert_eq!(
            p[0],
            ProgressLine {
                bytes: 32_768,
                percent: 0,
                bytes_per_sec: 0,
                file_done: false
            }
        );
        assert_eq!(p[2].bytes, 377_585_664);
        assert_eq!(p[2].percent, 35);
        assert!(
            p.windows(2).all(|w| w[0].bytes <= w[1].bytes),
            "meter went backwards: {p:?}"
        );
        let last = p.last().unwrap();
        assert!(last.file_done);
        assert_eq!(last.bytes, 1 << 30);
        assert_eq!(last.percent, 100);
        let r = TransferReport::from_output(LOCAL_DELTA);
        assert_eq!(
            r.checksum.as_deref(),
            Some("6c82c48c161bb1bb5dfb869d17ecf338")
        );
        assert_eq!(r.length, Some(1 << 30));
        assert_eq!(r.literal, 82_804_736);
        assert_eq!(r.matched, 990_937_088);
        assert_eq!(r.literal + r.matched, 1 << 30);
        assert_eq!(r.sent, 82_945_996);
        assert_eq!(r.received, 229_423);
    }

    /// Recorded: a full copy of 64 MiB pushed over ssh to loopback.
    #[test]
    fn recorded_ssh_full_transfer() {
        let r = TransferReport::from_output(SSH_FULL);
        assert_eq!(
            r.checksum.as_deref(),
            Some("a14c244711a042dc73616f1cb4baf7dc")
        );
        assert_eq!(r.length, Some(64 << 20));
        assert_eq!(r.literal, 64 << 20);
        assert_eq!(r.matched, 0);
        assert_eq!(r.sent, 67_125_323);
        let last = r.last_progress.unwrap();
        assert_eq!(last.bytes, 64 << 20);
        assert_eq!(last.bytes_per_sec, 99 * 1048576 + 80 * 1048576 / 100);
    }

    /// Recorded: rsync killed with SIGKILL after 2 s: a partial meter and
    /// no checksum, so the cycle cannot mistake it for a finished copy.
    #[test]
    fn recorded_killed_transfer_has_no_checksum() {
        let r = TransferReport::from_output(KILLED);
        assert_eq!(r.checksum, None);
        let last = r.last_progress.unwrap();
        assert_eq!(last.bytes, 300_711_936);
        assert!(!last.file_done);
        assert_eq!(r.sent, 0);
    }

    #[test]
    fn recorded_missing_source_reports_nothing_sent() {
        let r = TransferReport::from_output(MISSING);
        assert_eq!(r.checksum, None);
        assert_eq!(r.literal, 0);
    }

    #[test]
    fn item_lines() {
        assert_eq!(
            parse_line("wspare-item:AB12:1,024:dir/a:b.raw"),
            Line::Item(ItemLine {
                checksum: "ab12".into(),
                length: 1024,
                name: "dir/a:b.raw".into()
            })
        );
        // A file that was not transferred prints an empty or blank checksum.
        assert_eq!(parse_line("wspare-item::1024:a.raw"), Line::Other);
        assert_eq!(
            parse_line("wspare-item:                                :1024:a.raw"),
            Line::Other
        );
        assert_eq!(parse_line("wspare-item:zz:1:a"), Line::Other);
    }

    #[test]
    fn cycle_progress_adds_earlier_disks() {
        let l = ProgressLine {
            bytes: 10,
            percent: 50,
            bytes_per_sec: 5,
            file_done: false,
        };
        assert_eq!(
            cycle_progress(100, 200, &l),
            Progress {
                bytes_done: 110,
                bytes_total: 200,
                bytes_per_sec: 5
            }
        );
        let big = ProgressLine { bytes: 1000, ..l };
        assert_eq!(cycle_progress(100, 200, &big).bytes_done, 200);
    }

    #[test]
    fn dry_run_checksums() {
        let out = "wspare-item:f20cc0c8ab16fc517c405f15f5d8794c:8,388,608:z1\n\
                   wspare-item:f20cc0c8ab16fc517c405f15f5d8794c:8,388,608:z2\n";
        let c = parse_checksums(out);
        assert_eq!(c.len(), 2);
        assert_eq!(c[1].name, "z2");
        assert_eq!(c[1].length, 8 << 20);
    }

    proptest::proptest! {
        /// Any text: classified without a panic.
        #[test]
        fn any_line_is_classified(line in ".{0,200}") {
            let _ = parse_line(&line);
            let _ = parse_checksums(&line);
            let _ = TransferReport::from_output(&line);
        }

        /// Numbers as rsync prints them parse back.
        #[test]
        fn counts_round_trip(n in proptest::num::u64::ANY) {
            let plain = n.to_string();
            let mut grouped = String::new();
            for (i, c) in plain.chars().enumerate() {
                if i > 0 && (plain.len() - i) % 3 == 0 {
                    grouped.push(',');
                }
                grouped.push(c);
            }
            proptest::prop_assert_eq!(parse_count(&grouped), Some(n));
            let line = format!("  {grouped}  42%  1.50MB/s    0:01:02  ");
            proptest::prop_assert_eq!(
                parse_line(&line),
                Line::Progress(ProgressLine { bytes: n, percent: 42, bytes_per_sec: 1_572_864, file_done: false })
            );
        }
    }

    #[test]
    fn garbage_is_other() {
        for l in [
            "",
            "   ",
            "sent 1 bytes  received 2 bytes",
            "12% 1.00kB/s",
            "1,024 101% 1.00kB/s 0:00:01",
            "Number of files: 1 (reg: 1)",
        ] {
            assert_eq!(parse_line(l), Line::Other, "{l:?}");
        }
    }
}
