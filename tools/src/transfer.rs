//! `torusctl dump` and `load`: a volume to a file (or stdout) and back, over NBD, with a
//! progress line. A dump asks the node which extents hold data (`base:allocation`) and reads
//! only those, writing a sparse raw image (a dump to stdout writes the holes as zeroes); a
//! load skips runs of zeroes in its input, so the new volume stays thin. Every block read is
//! checked against its crc32c by the node; one that fails ends the dump with an error rather
//! than copying bad data.

use anyhow::{anyhow, Context, Result};
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};
use torus_frontend::nbd::client::Session;

/// Bytes per NBD request.
const STEP: usize = 4 << 20;
/// Runs of zeroes at least this long (and aligned) are not written by a load.
const ZERO_RUN: usize = 64 << 10;
/// Block-status questions cover at most this much of the volume at once.
const STATUS_WINDOW: u64 = 1 << 30;

/// A progress line on stderr (when it is a terminal): bytes, rate, time left.
pub struct Progress {
    total: u64,
    pub done: u64,
    started: Instant,
    shown: Instant,
    tty: bool,
}

impl Progress {
    pub fn new(total: u64) -> Progress {
        Progress {
            total,
            done: 0,
            started: Instant::now(),
            shown: Instant::now() - Duration::from_secs(1),
            tty: std::io::stderr().is_terminal(),
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if self.tty && self.shown.elapsed() >= Duration::from_millis(200) {
            self.shown = Instant::now();
            let rate = self.rate();
            let left = if rate > 0.0 {
                format!(
                    "{:.0} s left",
                    (self.total.saturating_sub(self.done)) as f64 / rate
                )
            } else {
                "…".into()
            };
            eprint!(
                "\r{:>10} / {:<10} {:>10}/s  {left}    ",
                crate::size::human(self.done),
                crate::size::human(self.total),
                crate::size::human(rate as u64)
            );
        }
    }

    fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }

    /// Clears the progress line; returns (seconds, bytes per second).
    pub fn finish(&self) -> (f64, f64) {
        if self.tty {
            eprint!("\r{:79}\r", "");
        }
        (self.started.elapsed().as_secs_f64(), self.rate())
    }
}

/// The data extents of the whole volume, as (offset, length).
fn data_extents(s: &mut Session) -> Result<Vec<(u64, u64)>> {
    let size = s.info.size;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = 0u64;
    while at < size {
        let ask = (size - at).min(STATUS_WINDOW) as u32;
        let extents = s
            .allocation(at, ask)
            .with_context(|| format!("block status at {at}"))?;
        for (len, data) in extents {
            let len = len.min(size - at);
            if data {
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == at => last.1 += len,
                    _ => out.push((at, len)),
                }
            }
            at += len;
            if at >= size {
                break;
            }
        }
    }
    Ok(out)
}

pub struct Summary {
    pub size: u64,
    pub data: u64,
    pub seconds: f64,
    pub rate: f64,
}

/// Where a dump goes: a file (sparse: only data extents are written) or a stream (holes are
/// written as zeroes).
pub enum Target<'a> {
    File(&'a mut std::fs::File),
    Stream(&'a mut dyn Write),
}

impl Write for Target<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Target::File(f) => f.write(b),
            Target::Stream(w) => w.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Target::File(f) => f.flush(),
            Target::Stream(w) => w.flush(),
        }
    }
}

/// Writes the volume to `out`.
pub fn dump(s: &mut Session, out: &mut Target) -> Result<Summary> {
    let seekable = matches!(out, Target::File(_));
    let size = s.info.size;
    let extents = data_extents(s)?;
    let data: u64 = extents.iter().map(|e| e.1).sum();
    let mut progress = Progress::new(data);
    let mut buf = vec![0u8; STEP];
    let zeroes = vec![0u8; STEP];
    let mut written = 0u64; // stream position
    if let Target::File(f) = out {
        f.set_len(0).context("truncate the dump file")?;
        f.set_len(size).context("size the dump file")?;
    }
    for (start, len) in extents {
        if !seekable {
            while written < start {
                let n = ((start - written) as usize).min(STEP);
                out.write_all(&zeroes[..n]).context("write the dump")?;
                written += n as u64;
            }
        } else if let Target::File(f) = out {
            f.seek(SeekFrom::Start(start))
                .context("seek in the dump file")?;
        }
        let mut at = start;
        while at < start + len {
            let n = ((start + len - at) as usize).min(STEP);
            s.read(at, &mut buf[..n])
                .with_context(|| format!("read {n} bytes at offset {at}"))?;
            out.write_all(&buf[..n]).context("write the dump")?;
            at += n as u64;
            progress.add(n as u64);
        }
        written = start + len;
    }
    if !seekable {
        while written < size {
            let n = ((size - written) as usize).min(STEP);
            out.write_all(&zeroes[..n]).context("write the dump")?;
            written += n as u64;
        }
    }
    match out {
        Target::File(f) => f.sync_all().context("fsync the dump file")?,
        Target::Stream(w) => w.flush().context("write the dump")?,
    }
    let (seconds, rate) = progress.finish();
    Ok(Summary {
        size,
        data,
        seconds,
        rate,
    })
}

/// Writes `input` (`total` bytes, or until EOF) into the volume from offset 0, skipping
/// zero runs; flushes at the end.
pub fn load(s: &mut Session, input: &mut dyn Read, total: u64) -> Result<Summary> {
    let size = s.info.size;
    let mut progress = Progress::new(total);
    let mut buf = vec![0u8; STEP];
    let mut at = 0u64;
    let mut data = 0u64;
    loop {
        let mut n = 0;
        while n < STEP {
            match input.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(anyhow!("read the input: {e}")),
            }
        }
        if n == 0 {
            break;
        }
        if at + n as u64 > size {
            return Err(anyhow!(
                "the input is larger than the volume ({} bytes): stopped at offset {at}",
                size
            ));
        }
        // Write the non-zero parts, in runs.
        let mut i = 0;
        while i < n {
            let end = (i + ZERO_RUN).min(n);
            if buf[i..end].iter().all(|b| *b == 0) {
                i = end;
                continue;
            }
            let mut j = end;
            while j < n {
                let e = (j + ZERO_RUN).min(n);
                if buf[j..e].iter().all(|b| *b == 0) {
                    break;
                }
                j = e;
            }
            s.write(at + i as u64, &buf[i..j])
                .with_context(|| format!("write {} bytes at offset {}", j - i, at + i as u64))?;
            data += (j - i) as u64;
            i = j;
        }
        at += n as u64;
        progress.add(n as u64);
    }
    s.flush().context("flush the volume")?;
    let (seconds, rate) = progress.finish();
    Ok(Summary {
        size: at,
        data,
        seconds,
        rate,
    })
}
