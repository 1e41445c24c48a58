//! How every binary ends: one readable error line (each cause once, with what
//! to do for the causes people meet most), and a quiet end when the reader of
//! its output closes the pipe.

use std::error::Error;

/// Writes to stdout; when the reader has gone (`flotilla audit | head`), the
/// process ends quietly with success, as `ls` does, instead of a panic in
/// the middle of a table. (The default SIGPIPE action is not restored
/// instead: a reset network connection would then kill the process without
/// a word.)
pub fn print(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            std::process::exit(1)
        }
    }
}

/// `println!` through [`print`].
#[macro_export]
macro_rules! outln {
    () => { $crate::exit::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::exit::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// The error and its causes on one line, each said once: library errors
/// often quote their source in their own message, or wrap one that does.
/// A known low-level cause gets a plain sentence in front of it.
pub fn error_text(e: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let part = c.to_string();
        let part = part.trim();
        if !part.is_empty() && !parts.iter().any(|p| p.contains(part)) {
            // "tcp connect error" then "tcp connect error: refused": keep the longer.
            match parts.last_mut() {
                Some(last) if part.contains(last.as_str()) => *last = part.to_string(),
                _ => parts.push(part.to_string()),
            }
        }
        cause = c.source();
    }
    let text = parts.join(": ");
    match hint(&text) {
        Some(h) => format!("{text} ({h})"),
        None => text,
    }
}

/// What a person should check, for causes whose own words do not say it.
fn hint(text: &str) -> Option<&'static str> {
    let t = text.to_ascii_lowercase();
    if t.contains("invalid peer certificate") || t.contains("unknownissuer") {
        Some(
            "the server's certificate is not from the CA this side trusts (the one in the credential file or join token): is this the right server, or was it set up again?",
        )
    } else if t.contains("connection refused") {
        Some("nothing is listening there: is the server running, and is the address right?")
    } else if t.contains("dns error") || t.contains("failed to lookup address") {
        Some("the server's host name does not resolve")
    } else if t.contains("deadline has elapsed") || t.contains("os error 110") {
        Some("the server did not answer in time: is the address right, and is it reachable?")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);

    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for E {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as &(dyn Error + 'static))
        }
    }

    fn chain(parts: &[&'static str]) -> E {
        parts
            .iter()
            .rev()
            .fold(None, |inner, p| Some(E(p, inner.map(Box::new))))
            .unwrap()
    }

    #[test]
    fn each_cause_is_said_once() {
        let e = chain(&[
            "cannot connect to the server at https://127.0.0.1:1",
            "transport error",
            "tcp connect error",
            "tcp connect error: Connection refused (os error 111)",
            "Connection refused (os error 111)",
        ]);
        assert_eq!(
            error_text(&e),
            "cannot connect to the server at https://127.0.0.1:1: transport error: \
             tcp connect error: Connection refused (os error 111) \
             (nothing is listening there: is the server running, and is the address right?)"
        );
        let e = chain(&[
            "invalid peer certificate: BadSignature",
            "invalid peer certificate: BadSignature",
        ]);
        let text = error_text(&e);
        assert_eq!(text.matches("BadSignature").count(), 1, "{text}");
        assert!(text.contains("not from the CA this side trusts"), "{text}");
    }

    #[test]
    fn plain_errors_are_left_alone() {
        let e = chain(&["unknown group store-ue (did you mean store-eu?)"]);
        assert_eq!(
            error_text(&e),
            "unknown group store-ue (did you mean store-eu?)"
        );
    }
}
