//! MQTT 3.1.1 and 5 codec for what clients send and what the front door answers. Pure: bytes in,
//! packets out, no I/O. Only the packets a client may send are decoded (CONNECT, PUBLISH, PUBACK,
//! SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT); MQTT 5 properties are length-checked and skipped,
//! except the few the front door must act on (topic alias, which it does not grant). Anything
//! malformed is an error, never a panic: this runs on bytes from an untrusted network and is
//! fuzzed (`fuzz/fuzz_targets/acl.rs`).

/// MQTT protocol level: 4 = 3.1.1, 5 = 5.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed remaining length")]
    Length,
    #[error("packet of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol `{0}` level {1} is not MQTT 3.1.1 or 5")]
    Protocol(String, u8),
    #[error("packet type {0} is not one a client sends")]
    Type(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
    pub will: Option<Will>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    Publish(Publish),
    PubAck(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect,
}

/// Splits one packet off the front of `buf`: `Ok(None)` when more bytes are needed,
/// `Ok(Some((header byte, body range end, body start)))` otherwise. `max` bounds the whole
/// packet, checked as soon as the length is known (before the body arrives).
pub fn frame(buf: &[u8], max: usize) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len: usize = 0;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(DecodeError::Length);
        }
    }
    let total = i + len;
    if total > max {
        return Err(DecodeError::TooLarge(total));
    }
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((buf[0], total, i)))
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&x, rest) = self
            .b
            .split_first()
            .ok_or(DecodeError::Malformed("truncated"))?;
        self.b = rest;
        Ok(x)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError::Malformed("truncated"));
        }
        let (x, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(x)
    }
    fn binary(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()?;
        self.bytes(n.into())
    }
    /// A UTF-8 string as MQTT defines it: valid UTF-8 and no U+0000.
    fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.binary()?;
        let s = std::str::from_utf8(b).map_err(|_| DecodeError::Malformed("invalid UTF-8"))?;
        if s.contains('\0') {
            return Err(DecodeError::Malformed("U+0000 in a string"));
        }
        Ok(s.to_owned())
    }
    fn varint(&mut self) -> Result<usize, DecodeError> {
        let mut v = 0usize;
        for shift in [0, 7, 14, 21] {
            let b = self.u8()?;
            v |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Length)
    }
    /// MQTT 5 properties: returns their bytes for the few callers that look inside.
    fn properties(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.varint()?;
        self.bytes(n)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
}

/// True when MQTT 5 publish properties carry a Topic Alias (0x23), which this server never
/// grants (Topic Alias Maximum defaults to 0). Walks the property list strictly.
fn has_topic_alias(mut p: &[u8]) -> Result<bool, DecodeError> {
    let mut found = false;
    while let Some((&id, rest)) = p.split_first() {
        let mut r = Reader { b: rest };
        match id {
            0x01 => {
                r.u8()?;
            } // payload format indicator
            0x02 => {
                r.bytes(4)?;
            } // message expiry
            0x23 => {
                r.u16()?;
                found = true;
            }
            0x08 | 0x03 => {
                r.string()?;
            } // response topic, content type
            0x09 => {
                r.binary()?;
            } // correlation data
            0x0B => {
                r.varint()?;
            } // subscription identifier
            0x26 => {
                r.string()?;
                r.string()?;
            } // user property
            _ => return Err(DecodeError::Malformed("unknown publish property")),
        }
        p = r.b;
    }
    Ok(found)
}

/// Decodes a CONNECT (the first packet). `body` is the packet after its fixed header.
pub fn decode_connect(header: u8, body: &[u8]) -> Result<Connect, DecodeError> {
    if header != 0x10 {
        return Err(DecodeError::Malformed("first packet is not CONNECT"));
    }
    let mut r = Reader { b: body };
    let name = r.string()?;
    let level = r.u8()?;
    let version = match (name.as_str(), level) {
        ("MQTT", 4) => Version::V4,
        ("MQTT", 5) => Version::V5,
        _ => return Err(DecodeError::Protocol(name, level)),
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let keep_alive = r.u16()?;
    if version == Version::V5 {
        r.properties()?;
    }
    let client_id = r.string()?;
    let will = if flags & 0x04 != 0 {
        if version == Version::V5 {
            r.properties()?;
        }
        let topic = r.string()?;
        let payload = r.binary()?.to_vec();
        let qos = (flags >> 3) & 0x03;
        if qos > 2 {
            return Err(DecodeError::Malformed("will QoS 3"));
        }
        Some(Will {
            topic,
            payload,
            qos,
            retain: flags & 0x20 != 0,
        })
    } else {
        if flags & 0x38 != 0 {
            return Err(DecodeError::Malformed("will QoS/retain without a will"));
        }
        None
    };
    let username = if flags & 0x80 != 0 {
        Some(r.string()?)
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(r.binary()?.to_vec())
    } else {
        None
    };
    if !r.b.is_empty() {
        return Err(DecodeError::Malformed("bytes after CONNECT payload"));
    }
    Ok(Connect {
        version,
        client_id,
        clean_start: flags & 0x02 != 0,
        keep_alive,
        username,
        password,
        will,
    })
}

/// Decodes any packet after CONNECT.
pub fn decode(header: u8, body: &[u8], v: Version) -> Result<Packet, DecodeError> {
    let mut r = Reader { b: body };
    let kind = header >> 4;
    let flags = header & 0x0f;
    let p = match kind {
        3 => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                return Err(DecodeError::Malformed("PUBLISH QoS 3"));
            }
            let topic = r.string()?;
            let pkid = if qos > 0 { r.u16()? } else { 0 };
            if qos > 0 && pkid == 0 {
                return Err(DecodeError::Malformed("packet id 0"));
            }
            if v == Version::V5 && has_topic_alias(r.properties()?)? {
                return Err(DecodeError::Malformed("topic alias not granted"));
            }
            if topic.is_empty() || topic.contains(['+', '#']) {
                return Err(DecodeError::Malformed(
                    "PUBLISH topic empty or with wildcards",
                ));
            }
            Packet::Publish(Publish {
                topic,
                qos,
                retain: flags & 0x01 != 0,
                dup: flags & 0x08 != 0,
                pkid,
                payload: r.rest().to_vec(),
            })
        }
        4 if flags == 0 => {
            let pkid = r.u16()?;
            Packet::PubAck(pkid)
        }
        8 | 10 if flags == 0x02 => {
            let pkid = r.u16()?;
            if v == Version::V5 {
                r.properties()?;
            }
            let mut subs = Vec::new();
            let mut unsubs = Vec::new();
            while !r.b.is_empty() {
                let f = r.string()?;
                if f.is_empty() {
                    return Err(DecodeError::Malformed("empty topic filter"));
                }
                if kind == 8 {
                    let opts = r.u8()?;
                    if opts & 0x03 == 3
                        || opts & 0xc0 != 0
                        || (v == Version::V4 && opts & 0xfc != 0)
                    {
                        return Err(DecodeError::Malformed("subscription options"));
                    }
                    subs.push((f, opts & 0x03));
                } else {
                    unsubs.push(f);
                }
            }
            if kind == 8 {
                if subs.is_empty() {
                    return Err(DecodeError::Malformed("SUBSCRIBE without filters"));
                }
                Packet::Subscribe {
                    pkid,
                    filters: subs,
                }
            } else {
                if unsubs.is_empty() {
                    return Err(DecodeError::Malformed("UNSUBSCRIBE without filters"));
                }
                Packet::Unsubscribe {
                    pkid,
                    filters: unsubs,
                }
            }
        }
        12 if flags == 0 && body.is_empty() => Packet::PingReq,
        14 if flags == 0 => Packet::Disconnect,
        1 => return Err(DecodeError::Malformed("second CONNECT")),
        4 | 8 | 10 | 12 | 14 => return Err(DecodeError::Malformed("reserved flags")),
        k => return Err(DecodeError::Type(k)),
    };
    Ok(p)
}

/// Appends an MQTT remaining length (variable-length integer).
pub fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// CONNACK with a return code (3.1.1) or reason code (5). Accepted MQTT 5 sessions are told the
/// server's limits: Maximum QoS 1 (AWS IoT has no QoS 2), no retain is promised upstream.
pub fn connack(v: Version, code: u8) -> Vec<u8> {
    match v {
        Version::V4 => vec![0x20, 0x02, 0x00, code],
        Version::V5 => {
            let props: &[u8] = if code == 0 { &[0x24, 0x01] } else { &[] };
            let mut out = vec![0x20];
            put_len(&mut out, 2 + 1 + props.len());
            out.extend_from_slice(&[0x00, code, props.len() as u8]);
            out.extend_from_slice(props);
            out
        }
    }
}

pub fn puback(v: Version, pkid: u16, reason: u8) -> Vec<u8> {
    let [hi, lo] = pkid.to_be_bytes();
    match (v, reason) {
        (Version::V5, r) if r != 0 => vec![0x40, 0x03, hi, lo, r],
        _ => vec![0x40, 0x02, hi, lo],
    }
}

/// SUBACK (or UNSUBACK with `kind` 0xB0) with one code per filter.
pub fn suback(v: Version, kind: u8, pkid: u16, codes: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    let [hi, lo] = pkid.to_be_bytes();
    let v5 = v == Version::V5;
    let body = if kind == 0xB0 && !v5 {
        2
    } else {
        2 + usize::from(v5) + codes.len()
    };
    put_len(&mut out, body);
    out.extend_from_slice(&[hi, lo]);
    if v5 {
        out.push(0);
    }
    if kind == 0x90 || v5 {
        out.extend_from_slice(codes);
    }
    out
}

pub const PINGRESP: [u8; 2] = [0xD0, 0x00];

/// Server DISCONNECT (MQTT 5 only; 3.1.1 servers just close).
pub fn disconnect_v5(reason: u8) -> Vec<u8> {
    vec![0xE0, 0x02, reason, 0x00]
}

/// A PUBLISH to a client (a delivery from the local router; `pkid` is used with QoS 1).
pub fn publish(
    v: Version,
    topic: &str,
    payload: &[u8],
    qos: u8,
    pkid: u16,
    retain: bool,
) -> Vec<u8> {
    let qos = qos.min(1);
    let mut out = vec![0x30 | (qos << 1) | u8::from(retain)];
    let len = 2
        + topic.len()
        + if qos == 1 { 2 } else { 0 }
        + usize::from(v == Version::V5)
        + payload.len();
    put_len(&mut out, len);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    if qos == 1 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    if v == Version::V5 {
        out.push(0);
    }
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn connect_v4(client: &str, user: Option<&str>, pass: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
        let mut flags = 0x02;
        if user.is_some() {
            flags |= 0x80;
        }
        if pass.is_some() {
            flags |= 0x40;
        }
        body.extend_from_slice(&[flags, 0, 60]);
        for s in [Some(client.as_bytes()), user.map(str::as_bytes), pass]
            .into_iter()
            .flatten()
        {
            body.extend_from_slice(&(s.len() as u16).to_be_bytes());
            body.extend_from_slice(s);
        }
        let mut out = vec![0x10];
        put_len(&mut out, body.len());
        out.extend(body);
        out
    }

    #[test]
    fn connect_roundtrip_and_limits() {
        let b = connect_v4("c1", Some("c1"), Some(b"pw"));
        let (h, end, start) = frame(&b, 1024).unwrap().unwrap();
        let c = decode_connect(h, &b[start..end]).unwrap();
        assert_eq!(c.client_id, "c1");
        assert_eq!(c.password.as_deref(), Some(&b"pw"[..]));
        assert_eq!(frame(&b[..3], 1024).unwrap(), None);
        assert!(matches!(frame(&b, 5), Err(DecodeError::TooLarge(_))));
        // Oversized remaining length is refused before the body arrives.
        assert!(matches!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0x7f], 1 << 20),
            Err(DecodeError::TooLarge(_))
        ));
        assert_eq!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Err(DecodeError::Length)
        );
    }

    #[test]
    fn publish_rejects_invalid_utf8_and_wildcards() {
        let bad = [0x00, 0x02, 0xff, 0xfe];
        assert!(decode(0x30, &bad, Version::V4).is_err());
        let wild = [0x00, 0x01, b'#'];
        assert!(decode(0x30, &wild, Version::V4).is_err());
        let ok = [0x00, 0x01, b'a', 0x00, 0x07, b'x'];
        assert_eq!(
            decode(0x32, &ok, Version::V4).unwrap(),
            Packet::Publish(Publish {
                topic: "a".into(),
                qos: 1,
                retain: false,
                dup: false,
                pkid: 7,
                payload: b"x".to_vec()
            })
        );
    }

    #[test]
    fn encodes_acks() {
        assert_eq!(puback(Version::V4, 258, 0x97), [0x40, 2, 1, 2]);
        assert_eq!(puback(Version::V5, 258, 0x97), [0x40, 3, 1, 2, 0x97]);
        assert_eq!(
            suback(Version::V4, 0x90, 1, &[1, 0x80]),
            [0x90, 4, 0, 1, 1, 0x80]
        );
        assert_eq!(suback(Version::V4, 0xB0, 1, &[0]), [0xB0, 2, 0, 1]);
        assert_eq!(connack(Version::V4, 5), [0x20, 2, 0, 5]);
    }

    #[test]
    fn deliveries_decode_as_what_was_encoded() {
        for v in [Version::V4, Version::V5] {
            for (qos, retain) in [(0, false), (1, true), (1, false)] {
                let bytes = publish(v, "cmd/c1/x", b"payload", qos, 42, retain);
                let (h, end, start) = frame(&bytes, 1 << 20).unwrap().unwrap();
                assert_eq!(end, bytes.len());
                let Packet::Publish(p) = decode(h, &bytes[start..end], v).unwrap() else {
                    panic!("not a publish");
                };
                assert_eq!(
                    (p.topic.as_str(), p.qos, p.retain, p.payload.as_slice()),
                    ("cmd/c1/x", qos, retain, &b"payload"[..])
                );
                if qos == 1 {
                    assert_eq!(p.pkid, 42);
                }
            }
        }
    }
}
