//! Turning a client's HPACK header block into the same block with every
//! Huffman-coded string written raw, before the `:authority` fix decodes it.
//!
//! The HPACK decoder we use (`loona-hpack`) builds a hash-map Huffman table
//! for every string and decodes bit by bit; grpc-go Huffman-codes every
//! literal, so that alone was about a fifth of the server's CPU when opening
//! gRPC tunnels (perf, fresh-connection benchmark). This pass walks the
//! block's representations (RFC 7541 section 6) without any table state and
//! decodes Huffman strings with `httlib-huffman`'s table-driven decoder.
//! Fields, their order, and their effect on the dynamic table are unchanged:
//! the table counts decoded octets, which are the same either way.

use std::io;

use httlib_huffman::DecoderSpeed;

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HPACK: {msg}"))
}

/// Reads an HPACK integer with an `n`-bit prefix at `pos`; returns it and the
/// position after it.
fn read_int(block: &[u8], pos: usize, n: u8) -> io::Result<(usize, usize)> {
    let mask = (1usize << n) - 1;
    let first = *block.get(pos).ok_or_else(|| bad("truncated integer"))? as usize & mask;
    if first < mask {
        return Ok((first, pos + 1));
    }
    let mut value = mask;
    let mut shift = 0u32;
    let mut i = pos + 1;
    loop {
        let b = *block.get(i).ok_or_else(|| bad("truncated integer"))?;
        i += 1;
        // Four continuation bytes hold 28 bits: far beyond any block we accept.
        if shift > 21 {
            return Err(bad("integer too large"));
        }
        value += ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok((value, i));
        }
    }
}

/// Appends a raw (not Huffman) string literal.
fn write_raw(out: &mut Vec<u8>, s: &[u8]) {
    let mut len = s.len();
    if len < 0x7f {
        out.push(len as u8);
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push((len & 0x7f) as u8 | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s);
}

/// Copies the string literal at `pos` to `out`, decoding it if it is Huffman
/// coded; returns the position after it.
fn copy_string(
    block: &[u8],
    pos: usize,
    out: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> io::Result<usize> {
    let huffman = block.get(pos).ok_or_else(|| bad("truncated string"))? & 0x80 != 0;
    let (len, start) = read_int(block, pos, 7)?;
    let end = start
        .checked_add(len)
        .filter(|&e| e <= block.len())
        .ok_or_else(|| bad("truncated string"))?;
    if huffman {
        scratch.clear();
        httlib_huffman::decode(&block[start..end], scratch, DecoderSpeed::FiveBits)
            .map_err(|_| bad("invalid Huffman string"))?;
        // The decoder accepts padding that is not the EOS prefix, which RFC
        // 7541 section 5.2 requires to be an error. A valid encoding is
        // unique, so re-encoding must give the same octets back.
        let mut check = Vec::with_capacity(end - start);
        httlib_huffman::encode(scratch, &mut check).map_err(|_| bad("invalid Huffman string"))?;
        if check != block[start..end] {
            return Err(bad("invalid Huffman padding"));
        }
        write_raw(out, scratch);
    } else {
        out.extend_from_slice(&block[pos..end]);
    }
    Ok(end)
}

/// The same header block with every string literal raw.
pub fn dehuffman(block: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len() * 2);
    let mut scratch = Vec::new();
    let mut pos = 0;
    while pos < block.len() {
        let b = block[pos];
        // (prefix bits of the index or size, does a literal follow?)
        let (prefix, literal) = if b & 0x80 != 0 {
            (7, false) // indexed field
        } else if b & 0x40 != 0 {
            (6, true) // literal with incremental indexing
        } else if b & 0x20 != 0 {
            (5, false) // dynamic table size update
        } else {
            (4, true) // literal without indexing / never indexed
        };
        let (index, next) = read_int(block, pos, prefix)?;
        out.extend_from_slice(&block[pos..next]);
        pos = next;
        if literal {
            if index == 0 {
                pos = copy_string(block, pos, &mut out, &mut scratch)?; // name
            }
            pos = copy_string(block, pos, &mut out, &mut scratch)?; // value
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        loona_hpack::Decoder::new()
            .decode(block)
            .expect("valid block")
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc7541_huffman_request_becomes_raw_with_the_same_fields() {
        // RFC 7541 C.4.1: GET http://www.example.com/ with Huffman-coded authority.
        let block = hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff");
        let raw = dehuffman(&block).unwrap();
        assert_eq!(
            &raw[3..],
            b"\x41\x0fwww.example.com",
            "indexed fields copied, the literal written raw"
        );
        assert_eq!(decode(&raw), decode(&block));
        assert_eq!(
            decode(&raw)[3],
            (b":authority".to_vec(), b"www.example.com".to_vec())
        );
    }

    #[test]
    fn literal_names_long_values_and_table_size_updates() {
        fn huffman(s: &[u8]) -> Vec<u8> {
            let mut enc = Vec::new();
            httlib_huffman::encode(s, &mut enc).unwrap();
            let mut lit = Vec::new();
            write_raw(&mut lit, &enc);
            lit[0] |= 0x80;
            lit
        }
        let long = vec![b'x'; 300];
        let mut block = vec![0x3f, 0xe1, 0x1f]; // size update to 4096
        block.push(0x00); // literal without indexing, literal name
        block.extend_from_slice(&huffman(b"grpc-timeout"));
        block.extend_from_slice(&huffman(&long)); // length needs two more octets
        block.push(0x10); // never indexed, literal name, raw strings
        block.extend_from_slice(b"\x01a\x01b");
        let raw = dehuffman(&block).unwrap();
        assert_eq!(
            decode(&raw),
            vec![
                (b"grpc-timeout".to_vec(), long.clone()),
                (b"a".to_vec(), b"b".to_vec())
            ]
        );
        assert_eq!(decode(&raw), decode(&block));
    }

    #[test]
    fn malformed_blocks_are_errors_never_panics() {
        // "a" is 00011: padded with the EOS prefix (111) it is valid; padded
        // with zeros it is not (RFC 7541 section 5.2).
        assert_eq!(decode(&dehuffman(b"\x41\x81\x1f").unwrap())[0].1, b"a");
        for bad in [
            &b"\x41"[..],
            b"\x41\x85ab",
            b"\xff\xff\xff\xff\xff\xff",
            b"\x40\x81",
            b"\x41\x81\x18",
        ] {
            assert!(dehuffman(bad).is_err(), "{bad:?}");
        }
        // Random input: any result, but no panic.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let len = (x % 40) as usize;
            let block: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = dehuffman(&block);
        }
    }
}
