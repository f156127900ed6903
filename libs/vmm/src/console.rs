//! Bounded capture of a VM's serial console.
//!
//! The guest controls what it prints, so the host keeps only the most recent `limit` bytes.
//! A guest that floods its console costs the host nothing but the copy. What it printed
//! is shown only sanitised ([`sanitize`]): terminal escape sequences and other control
//! characters removed, lines capped, so console text that reaches a log line, a record
//! or a client's error message can neither forge log lines nor drive a terminal.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

/// The tail of a console, shared between the reader task and whoever wants to show it.
#[derive(Debug, Clone)]
pub struct ConsoleLog {
    inner: Arc<Mutex<Ring>>,
}

#[derive(Debug)]
struct Ring {
    buf: VecDeque<u8>,
    limit: usize,
    dropped: u64,
}

impl ConsoleLog {
    pub fn new(limit: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Ring {
                buf: VecDeque::with_capacity(limit.min(64 * 1024)),
                limit: limit.max(1),
                dropped: 0,
            })),
        }
    }

    pub fn push(&self, data: &[u8]) {
        let mut ring = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let data = if data.len() > ring.limit {
            ring.dropped += (data.len() - ring.limit) as u64;
            &data[data.len() - ring.limit..]
        } else {
            data
        };
        let overflow = (ring.buf.len() + data.len()).saturating_sub(ring.limit);
        ring.buf.drain(..overflow);
        ring.dropped += overflow as u64;
        ring.buf.extend(data);
    }

    /// The kept output as text, sanitised ([`sanitize`]).
    pub fn tail(&self) -> String {
        let ring = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (a, b) = ring.buf.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        sanitize(&bytes)
    }

    /// Bytes discarded because they fell out of the window.
    pub fn dropped(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .dropped
    }
}

/// The longest console line shown, in characters; the rest of a line becomes "…".
pub const MAX_LINE_CHARS: usize = 240;

/// Console bytes as text that is safe to log and show: invalid UTF-8 replaced, ANSI
/// escape sequences (CSI, OSC and two-byte ones) removed, carriage returns and other
/// control characters except tab and newline dropped, each line cut at
/// [`MAX_LINE_CHARS`].
pub fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let mut line_chars = 0usize;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte in @..~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC and the other string commands: up to BEL or ESC \.
                Some(']' | 'P' | 'X' | '^' | '_') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' {
                            chars.next_if_eq(&'\\');
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\n' => {
                out.push('\n');
                line_chars = 0;
            }
            c if c.is_control() && c != '\t' => {}
            c => {
                if line_chars < MAX_LINE_CHARS {
                    out.push(c);
                } else if line_chars == MAX_LINE_CHARS {
                    out.push('…');
                }
                line_chars += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_tail() {
        let log = ConsoleLog::new(8);
        log.push(b"hello ");
        log.push(b"world");
        assert_eq!(log.tail(), "lo world");
        assert_eq!(log.dropped(), 3);
        log.push(b"0123456789abcdef");
        assert_eq!(log.tail(), "89abcdef");
        assert_eq!(log.dropped(), 3 + 8 + 8);
    }

    #[test]
    fn console_text_is_sanitised() {
        let raw = b"\x1b[31mred\x1b[0m ok\r\n\x1b]0;title\x07fake\x08\x00 line\n\ttab\xff";
        assert_eq!(sanitize(raw), "red ok\nfake line\n\ttab\u{fffd}");
        let long = "x".repeat(1000) + "\nnext";
        let clean = sanitize(long.as_bytes());
        let first = clean.lines().next().unwrap_or("");
        assert_eq!(first.chars().count(), MAX_LINE_CHARS + 1);
        assert!(first.ends_with('…'));
        assert!(clean.ends_with("\nnext"));
        // A forged log line stays inside the one it was printed on.
        assert_eq!(sanitize(b"a\rINFO forged"), "aINFO forged");
    }
}
