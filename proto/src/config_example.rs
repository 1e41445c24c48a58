//! The packaged example configs (`packaging/config/*.toml`) show every key
//! commented out (`#key = value`); the server's and the agent's tests set
//! them all and parse the result, so an example never names a key, or a
//! value, the program would refuse.

/// `example` with every commented-out `#key = value` line set.
pub fn with_every_key_set(example: &str) -> String {
    example
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_key_lines_are_set() {
        let set = super::with_every_key_set("# A comment = not a key.\n#a_key = 1\nb = 2");
        assert_eq!(set, "# A comment = not a key.\na_key = 1\nb = 2");
    }
}
