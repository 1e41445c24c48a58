//! Maintenance windows: the days and hours, in a group's IANA time zone, during
//! which normal rollouts may start nodes. Pure: parsing, "is it open now" and
//! "when does that change", all unit-tested here.
//!
//! A window is a span of civil (wall-clock) time on the days it names; each
//! occurrence is turned into real instants in the zone, so DST is handled by the
//! zone rules: a start or end that falls in a spring-forward gap moves to just
//! after the gap, one in a fall-back fold takes its first occurrence.

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp};

/// Most windows one group may have.
pub const MAX_WINDOWS: usize = 32;
/// Longest window spec accepted.
pub const MAX_SPEC_BYTES: usize = 64;
/// How far ahead `next_change` looks.
const HORIZON_SECS: i64 = 8 * 24 * 3600;
/// Minutes in a civil day; an end of 24:00 is stored as this.
const DAY_MINUTES: u16 = 24 * 60;
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// When a group's rollouts may start nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The name as given (or "UTC"), for `describe`.
    tz_name: String,
    tz: TimeZone,
    /// Empty means always open.
    windows: Vec<Window>,
}

/// One parsed spec.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Window {
    /// The days as written (lower-cased), for `describe`.
    days_text: String,
    /// Bit 0 = Monday … bit 6 = Sunday.
    days: u8,
    /// Minute of the day the window opens, 0..1440.
    start: u16,
    /// Minute of the day it closes, 0..=1440; at or before `start` means the
    /// next day.
    end: u16,
}

/// A schedule that could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error("unknown time zone {0:?}")]
    UnknownTimeZone(String),
    #[error("too many windows: {0} (at most {MAX_WINDOWS})")]
    TooManyWindows(usize),
    #[error("a window spec of {0} bytes is too long (at most {MAX_SPEC_BYTES})")]
    SpecTooLong(usize),
    #[error("window {spec:?}: {problem}")]
    Invalid { spec: String, problem: SpecProblem },
}

/// What is wrong inside one window spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecProblem {
    #[error("expected \"DAYS HH:MM-HH:MM\", e.g. \"mon-fri 22:00-04:00\"")]
    Shape,
    #[error(
        "unknown day {0:?} (use mon..sun, a range like mon-fri, a list like sat,sun, or daily)"
    )]
    UnknownDay(String),
    #[error("time {0:?} is not HH:MM")]
    BadTime(String),
    #[error("hour {0} is out of range")]
    HourOutOfRange(u32),
    #[error("minute {0} is out of range")]
    MinuteOutOfRange(u32),
    #[error("time {0:?} is past the end of the day")]
    PastEndOfDay(String),
    #[error("24:00 can only end a window")]
    StartsAtEndOfDay,
    #[error("the window is empty: it starts and ends at the same time")]
    Empty,
}

impl Schedule {
    /// `tz` is an IANA name ("Europe/Berlin", "UTC"); empty means UTC. `specs` like
    /// "mon-fri 22:00-04:00", "sat,sun 00:00-24:00", "daily 01:00-05:00", "tue 03:00-03:30".
    /// A window whose end is before its start runs past midnight into the next day (it belongs to the day it starts).
    /// No specs = always open.
    pub fn parse(tz: &str, specs: &[String]) -> Result<Schedule, WindowError> {
        let tz_name = tz.trim();
        let (tz_name, tz) = if tz_name.is_empty() {
            ("UTC".to_string(), TimeZone::UTC)
        } else {
            let zone =
                TimeZone::get(tz_name).map_err(|_| WindowError::UnknownTimeZone(clip(tz_name)))?;
            // Prefer the database's spelling ("europe/berlin" is accepted).
            let name = zone.iana_name().unwrap_or(tz_name).to_string();
            (name, zone)
        };
        if specs.len() > MAX_WINDOWS {
            return Err(WindowError::TooManyWindows(specs.len()));
        }
        let windows = specs
            .iter()
            .map(|spec| {
                if spec.len() > MAX_SPEC_BYTES {
                    return Err(WindowError::SpecTooLong(spec.len()));
                }
                parse_window(spec).map_err(|problem| WindowError::Invalid {
                    spec: spec.clone(),
                    problem,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Schedule {
            tz_name,
            tz,
            windows,
        })
    }

    /// Always open, in UTC.
    pub fn always() -> Schedule {
        Schedule {
            tz_name: "UTC".to_string(),
            tz: TimeZone::UTC,
            windows: Vec::new(),
        }
    }

    pub fn is_open(&self, unix_secs: i64) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        // An occurrence ends at most two civil days after the day it starts, so
        // only those of the last two days and today can hold `unix_secs`.
        self.occurrences(unix_secs, -2, 0)
            .iter()
            .any(|&(start, end)| start <= unix_secs && unix_secs < end)
    }

    /// The next moment (unix secs, > now) when is_open changes value, within the next 8 days; None if it never changes (always open, or no window).
    pub fn next_change(&self, unix_secs: i64) -> Option<i64> {
        if self.windows.is_empty() {
            return None;
        }
        let limit = unix_secs.saturating_add(HORIZON_SECS);
        // Days well past the horizon, so that a span which is merely cut off by
        // the end of the range ends beyond `limit` and is not taken for a change.
        let mut spans = self.occurrences(unix_secs, -2, 10);
        spans.sort_unstable();
        // Merge overlapping and touching occurrences: "sat,sun 00:00-24:00" does
        // not change at Saturday midnight.
        let mut merged: Vec<(i64, i64)> = Vec::with_capacity(spans.len());
        for (start, end) in spans {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        for (start, end) in merged {
            let change = if start > unix_secs {
                start
            } else if end > unix_secs {
                end
            } else {
                continue;
            };
            return (change <= limit).then_some(change);
        }
        None
    }

    /// Human description, e.g. "mon-fri 22:00-04:00 Europe/Berlin".
    pub fn describe(&self) -> String {
        if self.windows.is_empty() {
            return "always".to_string();
        }
        let windows: Vec<String> = self
            .windows
            .iter()
            .map(|w| format!("{} {}-{}", w.days_text, hhmm(w.start), hhmm(w.end)))
            .collect();
        format!("{} {}", windows.join(", "), self.tz_name)
    }

    /// Every occurrence, as [start, end) unix seconds, of the windows on the
    /// civil days `from..=to` relative to the zone's date at `unix_secs`.
    fn occurrences(&self, unix_secs: i64, from: i64, to: i64) -> Vec<(i64, i64)> {
        let Ok(now) = Timestamp::from_second(unix_secs) else {
            return Vec::new();
        };
        let today = now.to_zoned_datetime(self.tz.clone()).date();
        let mut out = Vec::new();
        for offset in from..=to {
            // Out of jiff's range only at the ends of time; nothing opens there.
            let Ok(day) = today.checked_add(Span::new().days(offset)) else {
                continue;
            };
            let bit = 1u8 << day.weekday().to_monday_zero_offset();
            for w in self.windows.iter().filter(|w| w.days & bit != 0) {
                let end_day_offset = if w.end > w.start { 0 } else { 1 };
                let (Some(start), Some(end)) = (
                    self.instant(day, 0, w.start),
                    self.instant(day, end_day_offset, w.end),
                ) else {
                    continue;
                };
                if start < end {
                    out.push((start, end));
                }
            }
        }
        out
    }

    /// The instant of `minute` (0..=1440) on `day` + `plus_days`, in the zone.
    fn instant(&self, day: Date, plus_days: i64, minute: u16) -> Option<i64> {
        let plus_days = plus_days + i64::from(minute / DAY_MINUTES);
        let minute = minute % DAY_MINUTES;
        let day = day.checked_add(Span::new().days(plus_days)).ok()?;
        // Both parts are in range by construction: minute < 1440.
        let at: DateTime = day.at((minute / 60) as i8, (minute % 60) as i8, 0, 0);
        let ts = self.tz.to_ambiguous_timestamp(at).compatible().ok()?;
        Some(ts.as_second())
    }
}

fn parse_window(spec: &str) -> Result<Window, SpecProblem> {
    let lowered = spec.to_ascii_lowercase();
    let mut parts = lowered.split_whitespace();
    let (Some(days_text), Some(times), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SpecProblem::Shape);
    };
    let days = parse_days(days_text)?;
    let (start, end) = times.split_once('-').ok_or(SpecProblem::Shape)?;
    let (start, end) = (parse_time(start)?, parse_time(end)?);
    if start == DAY_MINUTES {
        return Err(SpecProblem::StartsAtEndOfDay);
    }
    // 00:00-24:00 is a whole day, but 24:00 as an end is otherwise midnight.
    if start == end % DAY_MINUTES && end != DAY_MINUTES {
        return Err(SpecProblem::Empty);
    }
    Ok(Window {
        days_text: days_text.to_string(),
        days,
        start,
        end,
    })
}

/// "daily", "mon", "mon-fri", "fri-mon" (wraps over the weekend), "sat,sun".
fn parse_days(text: &str) -> Result<u8, SpecProblem> {
    let mut days = 0u8;
    for item in text.split(',') {
        if item == "daily" {
            days = 0x7f;
            continue;
        }
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (day_index(a)?, day_index(b)?),
            None => {
                let d = day_index(item)?;
                (d, d)
            }
        };
        let mut d = first;
        loop {
            days |= 1 << d;
            if d == last {
                break;
            }
            d = (d + 1) % 7;
        }
    }
    Ok(days)
}

fn day_index(name: &str) -> Result<u8, SpecProblem> {
    DAY_NAMES
        .iter()
        .position(|&d| d == name)
        .map(|i| i as u8)
        .ok_or_else(|| SpecProblem::UnknownDay(name.to_string()))
}

/// "HH:MM" (or "H:MM") to minutes of the day; "24:00" gives 1440.
fn parse_time(text: &str) -> Result<u16, SpecProblem> {
    let bad = || SpecProblem::BadTime(text.to_string());
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(h) || h.len() > 2 || !digits(m) || m.len() != 2 {
        return Err(bad());
    }
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 24 {
        return Err(SpecProblem::HourOutOfRange(h));
    }
    if m > 59 {
        return Err(SpecProblem::MinuteOutOfRange(m));
    }
    if h == 24 && m != 0 {
        return Err(SpecProblem::PastEndOfDay(text.to_string()));
    }
    Ok((h * 60 + m) as u16)
}

fn hhmm(minute: u16) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

/// Bounds untrusted text quoted back in an error.
fn clip(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(rfc3339: &str) -> i64 {
        rfc3339
            .parse::<Timestamp>()
            .expect("test timestamp")
            .as_second()
    }

    fn sched(tz: &str, specs: &[&str]) -> Schedule {
        let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        Schedule::parse(tz, &specs).expect("valid schedule")
    }

    fn problem(spec: &str) -> SpecProblem {
        match Schedule::parse("UTC", &[spec.to_string()]) {
            Err(WindowError::Invalid { problem, .. }) => problem,
            other => panic!("{spec:?}: expected a spec problem, got {other:?}"),
        }
    }

    #[test]
    fn berlin_follows_summer_and_winter_offsets() {
        let berlin = sched("Europe/Berlin", &["daily 22:00-23:00"]);
        let utc = sched("", &["daily 22:00-23:00"]);
        // July: Berlin is UTC+2, so the window is 20:00-21:00 UTC.
        assert!(berlin.is_open(ts("2025-07-04T20:00:00Z")));
        assert!(berlin.is_open(ts("2025-07-04T20:59:59Z")));
        assert!(!berlin.is_open(ts("2025-07-04T21:00:00Z")));
        assert!(!berlin.is_open(ts("2025-07-04T19:59:59Z")));
        // January: UTC+1, so 21:00-22:00 UTC.
        assert!(!berlin.is_open(ts("2025-01-10T20:30:00Z")));
        assert!(berlin.is_open(ts("2025-01-10T21:30:00Z")));
        assert!(!berlin.is_open(ts("2025-01-10T22:30:00Z")));
        // The same spec in UTC is UTC.
        assert!(!utc.is_open(ts("2025-07-04T20:30:00Z")));
        assert!(utc.is_open(ts("2025-07-04T22:30:00Z")));
        assert_eq!(
            berlin.next_change(ts("2025-01-10T12:00:00Z")),
            Some(ts("2025-01-10T21:00:00Z"))
        );
    }

    #[test]
    fn windows_past_midnight_belong_to_their_start_day() {
        let s = sched("UTC", &["mon-fri 22:00-04:00"]);
        // 2025-07-04 is a Friday.
        assert!(s.is_open(ts("2025-07-04T23:00:00Z")));
        assert!(s.is_open(ts("2025-07-05T03:59:00Z"))); // Saturday morning: Friday's
        assert!(!s.is_open(ts("2025-07-05T04:00:00Z")));
        assert!(!s.is_open(ts("2025-07-05T23:00:00Z"))); // Saturday night: no window
        assert!(!s.is_open(ts("2025-07-07T03:00:00Z"))); // Monday morning: Sunday's
        assert!(s.is_open(ts("2025-07-07T22:00:00Z")));
        assert!(!s.is_open(ts("2025-07-07T21:59:59Z")));
    }

    #[test]
    fn wrapping_day_ranges_and_lists() {
        let s = sched("UTC", &["fri-mon 10:00-12:00"]);
        // Friday 4 July .. Thursday 10 July 2025.
        let open: Vec<bool> = (4..=10)
            .map(|d| s.is_open(ts(&format!("2025-07-{d:02}T11:00:00Z"))))
            .collect();
        assert_eq!(open, [true, true, true, true, false, false, false]);

        let s = sched("UTC", &["sat,sun 00:00-24:00", "Wed 03:00-03:30"]);
        assert!(s.is_open(ts("2025-07-05T00:00:00Z")));
        assert!(s.is_open(ts("2025-07-06T23:59:59Z")));
        assert!(!s.is_open(ts("2025-07-07T00:00:00Z")));
        assert!(s.is_open(ts("2025-07-09T03:15:00Z")));
        assert!(!s.is_open(ts("2025-07-09T03:30:00Z")));
    }

    #[test]
    fn next_change_when_open_and_when_closed() {
        let s = sched("UTC", &["mon-fri 22:00-04:00"]);
        // Open on Friday night: closes Saturday 04:00.
        assert_eq!(
            s.next_change(ts("2025-07-04T23:00:00Z")),
            Some(ts("2025-07-05T04:00:00Z"))
        );
        // Closed on Saturday: opens Monday 22:00.
        assert_eq!(
            s.next_change(ts("2025-07-05T12:00:00Z")),
            Some(ts("2025-07-07T22:00:00Z"))
        );
        // Exactly at the opening the next change is the closing.
        assert_eq!(
            s.next_change(ts("2025-07-07T22:00:00Z")),
            Some(ts("2025-07-08T04:00:00Z"))
        );

        // Touching windows merge: no change at Saturday midnight.
        let weekend = sched("UTC", &["sat,sun 00:00-24:00"]);
        assert_eq!(
            weekend.next_change(ts("2025-07-05T10:00:00Z")),
            Some(ts("2025-07-07T00:00:00Z"))
        );
        // Overlapping windows merge too.
        let overlap = sched("UTC", &["daily 01:00-05:00", "daily 04:00-06:00"]);
        assert_eq!(
            overlap.next_change(ts("2025-07-05T02:00:00Z")),
            Some(ts("2025-07-05T06:00:00Z"))
        );

        // Once a week: the change is still within 8 days.
        let weekly = sched("UTC", &["tue 03:00-03:30"]);
        assert_eq!(
            weekly.next_change(ts("2025-07-08T03:30:00Z")),
            Some(ts("2025-07-15T03:00:00Z"))
        );

        assert_eq!(Schedule::always().next_change(0), None);
        assert!(Schedule::always().is_open(0));
        let all_day = sched("UTC", &["daily 00:00-24:00"]);
        assert!(all_day.is_open(ts("2025-07-05T10:00:00Z")));
        assert_eq!(all_day.next_change(ts("2025-07-05T10:00:00Z")), None);
    }

    #[test]
    fn dst_transitions_use_the_zone_rules() {
        // 2025-03-30, Berlin: 02:00 CET jumps to 03:00 CEST. 01:00-04:00 local
        // is then 00:00-02:00 UTC: two real hours.
        let s = sched("Europe/Berlin", &["sun 01:00-04:00"]);
        assert!(s.is_open(ts("2025-03-30T00:00:00Z")));
        assert_eq!(
            s.next_change(ts("2025-03-30T00:30:00Z")),
            Some(ts("2025-03-30T02:00:00Z"))
        );
        // 2025-10-26: 03:00 CEST falls back to 02:00 CET; 01:00-04:00 local is
        // 23:00-03:00 UTC, four real hours.
        assert_eq!(
            s.next_change(ts("2025-10-25T12:00:00Z")),
            Some(ts("2025-10-25T23:00:00Z"))
        );
        assert_eq!(
            s.next_change(ts("2025-10-25T23:00:00Z")),
            Some(ts("2025-10-26T03:00:00Z"))
        );
    }

    #[test]
    fn describe_names_windows_and_zone() {
        assert_eq!(
            sched("Europe/Berlin", &["mon-fri 22:00-04:00"]).describe(),
            "mon-fri 22:00-04:00 Europe/Berlin"
        );
        assert_eq!(
            sched("", &["SAT,SUN  0:00-24:00", "daily 01:00-05:00"]).describe(),
            "sat,sun 00:00-24:00, daily 01:00-05:00 UTC"
        );
        assert_eq!(Schedule::always().describe(), "always");
        assert_eq!(sched("UTC", &[]), Schedule::always());
    }

    #[test]
    fn bad_inputs_say_what_is_wrong() {
        let err = Schedule::parse("Mars/Base", &[]).unwrap_err();
        assert_eq!(err.to_string(), "unknown time zone \"Mars/Base\"");
        let err = Schedule::parse("UTC", &["mon-fri 25:00-04:00".to_string()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "window \"mon-fri 25:00-04:00\": hour 25 is out of range"
        );

        assert_eq!(problem("mon-fri"), SpecProblem::Shape);
        assert_eq!(problem("mon 01:00-02:00 extra"), SpecProblem::Shape);
        assert_eq!(problem("mon 01:00"), SpecProblem::Shape);
        assert_eq!(
            problem("mun 01:00-02:00"),
            SpecProblem::UnknownDay("mun".into())
        );
        assert_eq!(
            problem("mon,,tue 01:00-02:00"),
            SpecProblem::UnknownDay("".into())
        );
        assert_eq!(problem("mon 1h-02:00"), SpecProblem::BadTime("1h".into()));
        assert_eq!(
            problem("mon 01:5-02:00"),
            SpecProblem::BadTime("01:5".into())
        );
        assert_eq!(
            problem("mon 01:60-02:00"),
            SpecProblem::MinuteOutOfRange(60)
        );
        assert_eq!(
            problem("mon 01:00-24:30"),
            SpecProblem::PastEndOfDay("24:30".into())
        );
        assert_eq!(problem("mon 24:00-02:00"), SpecProblem::StartsAtEndOfDay);
        assert_eq!(problem("mon 03:00-03:00"), SpecProblem::Empty);
        assert_eq!(problem("mon 00:00-00:00"), SpecProblem::Empty);

        let many: Vec<String> = (0..33).map(|_| "mon 01:00-02:00".to_string()).collect();
        assert!(matches!(
            Schedule::parse("UTC", &many),
            Err(WindowError::TooManyWindows(33))
        ));
        let long = format!("mon{} 01:00-02:00", ",mon".repeat(20));
        assert!(matches!(
            Schedule::parse("UTC", &[long]),
            Err(WindowError::SpecTooLong(_))
        ));
        // A huge zone name is not echoed in full.
        let err = Schedule::parse(&"x".repeat(10_000), &[]).unwrap_err();
        assert!(err.to_string().len() < 100);
    }
}
