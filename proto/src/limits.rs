//! Limits shared by server, agent and CLI. Every input from outside has one.

use std::net::{IpAddr, Ipv6Addr};

/// Largest gRPC message either side decodes.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest CSR the server parses.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// Longest hostname, os, arch, version or machine id string.
pub const MAX_FACT_LEN: usize = 255;
/// Most labels on a node or a token.
pub const MAX_LABELS: usize = 64;
/// Longest label key.
pub const MAX_LABEL_KEY_LEN: usize = 63;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 255;
/// Longest group name.
pub const MAX_GROUP_NAME_LEN: usize = 63;
/// Longest free-text description.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Largest desired node count of a group.
pub const MAX_DESIRED: u32 = 1_000_000;
/// Largest number of joins one token may allow.
pub const MAX_TOKEN_USES: u32 = 1_000_000;
/// Longest token lifetime.
pub const MAX_TOKEN_TTL_SECS: u64 = 366 * 24 * 3600;
/// Most audit entries returned by one call.
pub const MAX_AUDIT_PAGE: u32 = 10_000;
/// Artifact bytes per streamed chunk.
pub const ARTIFACT_CHUNK_BYTES: usize = 64 * 1024;
/// Longest error or log tail in a report.
pub const MAX_REPORT_TEXT: usize = 8 * 1024;

/// Why a name, label or fact was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
    #[error("{what} {value:?} may only contain a-z, A-Z, 0-9, '-', '_' and '.'")]
    BadChar { what: &'static str, value: String },
    #[error("too many labels: {count} (at most {max})")]
    TooManyLabels { count: usize, max: usize },
}

/// Checks a group name, label key or similar identifier: 1..=max bytes of
/// `[A-Za-z0-9._-]`, not starting with '.' or '-'.
pub fn check_name(what: &'static str, value: &str, max: usize) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if value.len() > max {
        return Err(NameError::TooLong { what, max });
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !value.chars().all(ok_char) || value.starts_with(['.', '-']) {
        return Err(NameError::BadChar {
            what,
            value: value.to_string(),
        });
    }
    Ok(())
}

/// Checks free text (facts, descriptions, label values): bounded, no control characters.
pub fn check_text(what: &'static str, value: &str, max: usize) -> Result<(), NameError> {
    if value.len() > max {
        return Err(NameError::TooLong { what, max });
    }
    if value.chars().any(char::is_control) {
        return Err(NameError::BadChar {
            what,
            value: value.escape_debug().to_string(),
        });
    }
    Ok(())
}

/// Checks a label set: count, key shape and value length.
pub fn check_labels<'a>(
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), NameError> {
    let count = labels.len();
    if count > MAX_LABELS {
        return Err(NameError::TooManyLabels {
            count,
            max: MAX_LABELS,
        });
    }
    for (k, v) in labels {
        check_name("label key", k, MAX_LABEL_KEY_LEN)?;
        check_text("label value", v, MAX_LABEL_VALUE_LEN)?;
    }
    Ok(())
}

/// The source a connection is counted under: an IPv4 address (an IPv4-mapped
/// IPv6 address as the IPv4 one), or the /64 of an IPv6 address, which one
/// host or one customer usually holds whole: counted address by address, one
/// machine could take 2^64 sources' allowance.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("group", "store-eu_1.a", 63).is_ok());
        assert_eq!(
            check_name("group", "", 63),
            Err(NameError::Empty { what: "group" })
        );
        assert!(check_name("group", "../etc", 63).is_err());
        assert!(check_name("group", "a/b", 63).is_err());
        assert!(check_name("group", "-x", 63).is_err());
        assert!(check_name("group", &"a".repeat(64), 63).is_err());
    }

    #[test]
    fn text_refuses_control_characters() {
        assert!(check_text("hostname", "web-1", 10).is_ok());
        assert!(check_text("hostname", "a\nb", 10).is_err());
        assert!(check_text("hostname", "abcdefghijk", 10).is_err());
    }
}

/// `s` cut to at most `max` bytes, at a character boundary, ending in a marker
/// that says how much was cut: what any outside string gets before it reaches an
/// error, a log line, a journal or a report.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let marker = |cut: usize| format!("…[{cut} more bytes]");
    let mut end = max.saturating_sub(marker(s.len()).len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{}", &s[..end], marker(s.len() - end))
}

/// The last at most `max` bytes of `s` (output tails keep their end), with a
/// marker in front that says how much was cut.
pub fn clip_front(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let marker = |cut: usize| format!("[{cut} bytes before]…");
    let mut start = s.len() - max + marker(s.len()).len();
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("{}{}", marker(start), &s[start..])
}

#[cfg(test)]
mod clip_tests {
    use super::*;

    #[test]
    fn clipped_text_is_bounded_and_says_so() {
        assert_eq!(clip("short", 100), "short");
        let long = "é".repeat(10_000);
        let c = clip(&long, 256);
        assert!(c.len() <= 256, "{}", c.len());
        assert!(c.ends_with("more bytes]"), "{c}");
        let t = clip_front(&format!("{long}END"), 256);
        assert!(t.len() <= 256, "{}", t.len());
        assert!(t.ends_with("END") && t.starts_with('['), "{t}");
    }
}
