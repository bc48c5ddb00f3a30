//! How client commands print: errors and their exit codes, human tables, times.
//!
//! Exit codes (every client command): 0 ok; 1 refused by the server (printed as
//! `error: <kind>: <message>`, `kind` one of the control plane's typed errors) or failed
//! at run time (unreachable, timed out); 2 bad usage or a local error (seed file, URL, CA).

use serde::Serialize;
use unibus::client::ClientError;

/// Prints `e` and returns its exit code.
pub fn fail(e: &ClientError) -> u8 {
    eprintln!("error: {e}");
    match e {
        ClientError::Local(_) => 2,
        _ => 1,
    }
}

/// Prints `value` as one line of JSON.
pub fn json<T: Serialize>(value: &T) -> u8 {
    match serde_json::to_string(value) {
        Ok(text) => {
            println!("{text}");
            0
        }
        Err(e) => {
            eprintln!("error: cannot encode the output: {e}");
            2
        }
    }
}

/// Prints rows under a header, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<width$}", width = widths[i])
                }
            })
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Unix milliseconds as RFC 3339 UTC (`2026-01-02T03:04:05.678Z`).
pub fn time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// An optional unix-ms time, or `-`.
pub fn maybe_time(ms: Option<u64>) -> String {
    ms.map(time).unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(super::time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::time(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
        assert_eq!(super::time(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
