//! How every program writes a time for people: RFC 3339, in UTC.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `t` as RFC 3339 ("2026-12-04T03:07:09Z").
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Unix seconds as RFC 3339; the number itself if it is no time.
pub fn unix_secs(secs: i64) -> String {
    OffsetDateTime::from_unix_timestamp(secs).map_or_else(|_| secs.to_string(), rfc3339)
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_read_as_rfc3339_in_utc() {
        assert_eq!(super::unix_secs(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::unix_secs(1_798_880_103), "2027-01-02T08:55:03Z");
        assert_eq!(super::unix_secs(i64::MAX), i64::MAX.to_string());
    }
}
