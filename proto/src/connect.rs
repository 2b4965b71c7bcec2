//! HTTP CONNECT: parsing the request head and mapping dial errors to statuses.
//!
//! kube-apiserver sends `CONNECT host:port HTTP/1.1` with `Host: 127.0.0.1` and
//! expects exactly `HTTP/1.1 200 Connection Established\r\n\r\n` back, with no
//! byte after it before tunnel data.

/// The success response, byte for byte.
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection Established\r\n\r\n";

/// Longest request head we accept; a longer one is refused with 431.
pub const MAX_HEAD: usize = 16 * 1024;

/// Outcome of parsing the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Need more bytes.
    Partial,
    /// A CONNECT request for `target`; the head is `head_len` bytes long, and
    /// anything after it is early tunnel data.
    Connect {
        /// `host:port`.
        target: String,
        /// Length of the request head including the blank line.
        head_len: usize,
    },
    /// Refuse with this status and reason.
    Reject {
        /// HTTP status.
        status: u16,
        /// Human-readable reason for the body and the log.
        reason: String,
    },
}

/// Parses a CONNECT request head from `buf`.
pub fn parse_request(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return reject(431, "request head too large")
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return reject(431, "too many request headers"),
        Err(e) => return reject(400, &format!("malformed HTTP request: {e}")),
    };
    let method = req.method.unwrap_or_default();
    if method != "CONNECT" {
        return reject(405, &format!("method {method} not allowed, only CONNECT"));
    }
    if req.version != Some(1) {
        return reject(505, "only HTTP/1.1 is supported");
    }
    let target = req.path.unwrap_or_default();
    if !valid_authority(target) {
        return reject(400, &format!("CONNECT target {target:?} is not host:port"));
    }
    Parsed::Connect {
        target: target.to_string(),
        head_len,
    }
}

fn reject(status: u16, reason: &str) -> Parsed {
    Parsed::Reject {
        status,
        reason: reason.to_string(),
    }
}

/// `host:port` or `[v6]:port` with a numeric port.
fn valid_authority(t: &str) -> bool {
    let Some((host, port)) = t.rsplit_once(':') else {
        return false;
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner.ends_with(']') && inner.len() > 1
    } else {
        !host.is_empty() && !host.contains(['/', '@', ' ', '[', ']'])
    };
    host_ok && port.parse::<u16>().is_ok()
}

/// The status a CONNECT client gets for an agent's dial error, chosen by the
/// error text as the reference does: timeouts 504, file-descriptor exhaustion
/// 503, everything else (refused, unknown host, TLS) 502. See
/// [`crate::reason::DialReason::http_status`].
pub fn status_for_dial_error(error: &str) -> u16 {
    crate::reason::DialReason::from_text(error).http_status()
}

/// The response header that carries a failed dial's [`DialReason`] label
/// (our extension; clients that do not know it see the usual status and text).
///
/// [`DialReason`]: crate::reason::DialReason
pub const DIAL_REASON_HEADER: &str = "X-Konnectivity-Dial-Reason";

/// A complete HTTP/1.1 error response with a text body, closing the connection.
pub fn error_response(status: u16, body: &str) -> Vec<u8> {
    error_response_with(status, body, None)
}

/// [`error_response`] for a failed dial, with its reason in
/// [`DIAL_REASON_HEADER`].
pub fn dial_error_response(reason: crate::reason::DialReason, body: &str) -> Vec<u8> {
    error_response_with(reason.http_status(), body, Some(reason))
}

fn error_response_with(
    status: u16,
    body: &str,
    dial_reason: Option<crate::reason::DialReason>,
) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    };
    let body = format!("{body}\n");
    let extra = dial_reason
        .map(|r| format!("{DIAL_REASON_HEADER}: {r}\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_kube_apiserver_sends() {
        let req = b"CONNECT 10.0.0.5:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nearly";
        assert_eq!(
            parse_request(req),
            Parsed::Connect {
                target: "10.0.0.5:10250".into(),
                head_len: req.len() - 5
            }
        );
        assert_eq!(
            parse_request(b"CONNECT 10.0.0.5:10250 HTTP/1.1\r\nHo"),
            Parsed::Partial
        );
        assert!(matches!(
            parse_request(b"CONNECT [fd00::1]:443 HTTP/1.1\r\n\r\n"),
            Parsed::Connect { .. }
        ));
    }

    #[test]
    fn refuses_other_methods_bad_targets_and_garbage() {
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Parsed::Reject { status: 405, .. }
        ));
        assert!(matches!(
            parse_request(b"CONNECT nowhere HTTP/1.1\r\n\r\n"),
            Parsed::Reject { status: 400, .. }
        ));
        assert!(matches!(
            parse_request(b"CONNECT a:99999 HTTP/1.1\r\n\r\n"),
            Parsed::Reject { status: 400, .. }
        ));
        assert!(matches!(
            parse_request(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
            Parsed::Reject { status: 400, .. }
        ));
        assert!(matches!(
            parse_request(&vec![b'a'; MAX_HEAD]),
            Parsed::Reject { .. }
        ));
    }

    #[test]
    fn dial_errors_map_to_the_reference_statuses() {
        assert_eq!(
            status_for_dial_error("dial tcp 10.0.0.5:1: i/o timeout"),
            504
        );
        assert_eq!(status_for_dial_error("dial tcp: too many open files"), 503);
        assert_eq!(
            status_for_dial_error("dial tcp 127.0.0.1:1: connect: connection refused"),
            502
        );
    }

    #[test]
    fn error_response_is_well_formed() {
        let r = String::from_utf8(error_response(502, "refused")).unwrap();
        assert!(r.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(r.ends_with("\r\n\r\nrefused\n"));
        assert!(r.contains("Content-Length: 8\r\n"));
    }
}
