//! Finds the `GOAWAY` frames in the bytes an HTTP/2 server writes, so the
//! server can say when and why a connection was ended. The HTTP/2 library
//! ends an abusive connection (rapid stream resets, a header block without
//! end, a protocol violation) with a `GOAWAY` carrying an error code and tells
//! the application nothing; watching what it writes is how the server logs
//! and counts it.
//!
//! The watcher reads frame headers only and skips payloads, so it costs a few
//! comparisons per write.

/// Length of an HTTP/2 frame header.
const FRAME_HEADER: usize = 9;
/// Frame type of `GOAWAY`.
const GOAWAY: u8 = 7;
/// The graceful `GOAWAY` (shutdown), not an error.
pub const NO_ERROR: u32 = 0;

/// The RFC 9113 name of an HTTP/2 error code.
pub fn reason(code: u32) -> &'static str {
    match code {
        0 => "NO_ERROR",
        1 => "PROTOCOL_ERROR",
        2 => "INTERNAL_ERROR",
        3 => "FLOW_CONTROL_ERROR",
        4 => "SETTINGS_TIMEOUT",
        5 => "STREAM_CLOSED",
        6 => "FRAME_SIZE_ERROR",
        7 => "REFUSED_STREAM",
        8 => "CANCEL",
        9 => "COMPRESSION_ERROR",
        10 => "CONNECT_ERROR",
        11 => "ENHANCE_YOUR_CALM",
        12 => "INADEQUATE_SECURITY",
        13 => "HTTP_1_1_REQUIRED",
        _ => "UNKNOWN",
    }
}

/// Follows the frames of one connection's outgoing bytes.
#[derive(Debug, Default)]
pub struct GoawayWatch {
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// In a `GOAWAY` payload: its first 8 bytes (last stream id, error code).
    goaway: Option<([u8; 8], usize)>,
}

impl GoawayWatch {
    /// A watcher at the start of a server's output (its first frame).
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next bytes written; returns the error code of each
    /// `GOAWAY` whose code is complete in them (usually none).
    pub fn wrote(&mut self, mut bytes: &[u8]) -> Vec<u32> {
        let mut found = Vec::new();
        while !bytes.is_empty() {
            if self.left == 0 && self.goaway.is_none() {
                let n = (FRAME_HEADER - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have < FRAME_HEADER {
                    break;
                }
                self.have = 0;
                let h = self.header;
                self.left =
                    (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                if h[3] == GOAWAY && self.left >= 8 {
                    self.goaway = Some(([0; 8], 0));
                }
                continue;
            }
            if let Some((mut head, got)) = self.goaway.take() {
                let n = (8 - got).min(bytes.len());
                head[got..got + n].copy_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                self.left -= n;
                if got + n == 8 {
                    found.push(u32::from_be_bytes([head[4], head[5], head[6], head[7]]));
                } else {
                    self.goaway = Some((head, got + n));
                }
                continue;
            }
            let n = self.left.min(bytes.len());
            self.left -= n;
            bytes = &bytes[n..];
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            0,
        ];
        f.extend_from_slice(payload);
        f
    }

    fn goaway(code: u32, debug: &[u8]) -> Vec<u8> {
        let mut p = 7u32.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(debug);
        frame(GOAWAY, &p)
    }

    #[test]
    fn a_goaway_among_other_frames_is_found_whatever_the_write_sizes() {
        let mut out = frame(4, &[0, 3, 0, 0, 0, 100]);
        out.extend(frame(0, &[0x5a; 40_000]));
        // A DATA payload that looks like a GOAWAY frame must not count.
        out.extend(frame(0, &goaway(1, b"inside data")));
        out.extend(goaway(11, b"too_many_resets"));
        out.extend(frame(6, &[0; 8]));
        for step in [1, 2, 7, 9, 13, 4096, out.len()] {
            let mut w = GoawayWatch::new();
            let found: Vec<u32> = out.chunks(step).flat_map(|c| w.wrote(c)).collect();
            assert_eq!(found, vec![11], "writes of {step} bytes");
        }
        assert_eq!(reason(11), "ENHANCE_YOUR_CALM");
    }

    #[test]
    fn a_graceful_goaway_reports_no_error() {
        let mut w = GoawayWatch::new();
        assert_eq!(w.wrote(&goaway(NO_ERROR, b"")), vec![NO_ERROR]);
        assert!(w.wrote(&frame(6, &[0; 8])).is_empty());
    }
}
