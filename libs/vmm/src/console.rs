//! Bounded capture of a VM's serial console.
//!
//! The guest controls what it prints, so the host keeps only the most recent `limit` bytes.
//! A guest that floods its console costs the host nothing but the copy.

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

    /// The kept output as text (invalid UTF-8 replaced).
    pub fn tail(&self) -> String {
        let ring = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (a, b) = ring.buf.as_slices();
        let mut bytes = Vec::with_capacity(a.len() + b.len());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(b);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Bytes discarded because they fell out of the window.
    pub fn dropped(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .dropped
    }
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
}
