//! MQTT 3.1.1 and MQTT 5 packet codec for the emulator's broker side.
//!
//! Owns: decoding client→server packets and encoding server→client packets, with every malformed
//! input turned into a [`CodecError`] that names what was wrong. No I/O, no broker state.
//! This code is the emulator's own: it must not share protocol code with the daemon.

use std::fmt;

/// MQTT protocol level from CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("malformed remaining length")]
    BadRemainingLength,
    #[error("packet of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("packet type {0} is reserved or not sent by clients")]
    BadPacketType(u8),
    #[error("invalid fixed-header flags {flags:#06b} for {packet}")]
    BadFlags { packet: &'static str, flags: u8 },
    #[error("{packet}: truncated while reading {field}")]
    Truncated {
        packet: &'static str,
        field: &'static str,
    },
    #[error("{packet}: {field} is not valid UTF-8")]
    BadUtf8 {
        packet: &'static str,
        field: &'static str,
    },
    #[error("CONNECT: unsupported protocol name {0:?}")]
    BadProtocolName(String),
    #[error("CONNECT: unsupported protocol level {0}")]
    BadProtocolLevel(u8),
    #[error("CONNECT: reserved flag bit set")]
    ReservedConnectFlag,
    #[error("{packet}: invalid QoS 3")]
    BadQos { packet: &'static str },
    #[error("{packet}: unknown property identifier {id:#04x}")]
    BadProperty { packet: &'static str, id: u8 },
    #[error("{packet}: {reason}")]
    Invalid {
        packet: &'static str,
        reason: &'static str,
    },
    #[error("first packet must be CONNECT, got {0}")]
    NotConnect(&'static str),
}

/// A value of an MQTT 5 property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PropValue {
    Byte(u8),
    U16(u16),
    U32(u32),
    VarInt(u32),
    Str(String),
    Bin(Vec<u8>),
    Pair(String, String),
}

/// MQTT 5 properties in wire order (empty for 3.1.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties(pub Vec<(u8, PropValue)>);

impl Properties {
    pub fn get(&self, id: u8) -> Option<&PropValue> {
        self.0.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
    }
    pub fn u32(&self, id: u8) -> Option<u32> {
        match self.get(id) {
            Some(PropValue::U32(v)) | Some(PropValue::VarInt(v)) => Some(*v),
            _ => None,
        }
    }
    pub fn u16(&self, id: u8) -> Option<u16> {
        match self.get(id) {
            Some(PropValue::U16(v)) => Some(*v),
            _ => None,
        }
    }
    pub fn push(&mut self, id: u8, v: PropValue) {
        self.0.push((id, v));
    }
}

pub mod prop {
    pub const PAYLOAD_FORMAT: u8 = 0x01;
    pub const MESSAGE_EXPIRY: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_ID: u8 = 0x0B;
    pub const SESSION_EXPIRY: u8 = 0x11;
    pub const ASSIGNED_CLIENT_ID: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUB_AVAILABLE: u8 = 0x28;
    pub const SUB_ID_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUB_AVAILABLE: u8 = 0x2A;
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
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    pub pkid: u16,
    pub properties: Properties,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: u16,
    /// (filter, options byte); QoS is `options & 3`.
    pub filters: Vec<(String, u8)>,
    pub properties: Properties,
}

/// A packet sent by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Connect),
    Publish(Publish),
    PubAck { pkid: u16 },
    PubRec { pkid: u16 },
    PubRel { pkid: u16 },
    PubComp { pkid: u16 },
    Subscribe(Subscribe),
    Unsubscribe { pkid: u16, filters: Vec<String> },
    PingReq,
    Disconnect { reason: u8 },
    Auth,
}

impl Packet {
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck { .. } => "PUBACK",
            Packet::PubRec { .. } => "PUBREC",
            Packet::PubRel { .. } => "PUBREL",
            Packet::PubComp { .. } => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::Unsubscribe { .. } => "UNSUBSCRIBE",
            Packet::PingReq => "PINGREQ",
            Packet::Disconnect { .. } => "DISCONNECT",
            Packet::Auth => "AUTH",
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    packet: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], packet: &'static str) -> Self {
        Reader {
            buf,
            pos: 0,
            packet,
        }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], CodecError> {
        if self.remaining() < n {
            return Err(CodecError::Truncated {
                packet: self.packet,
                field,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, CodecError> {
        Ok(self.take(1, field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, CodecError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, CodecError> {
        let b = self.take(4, field)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn varint(&mut self, field: &'static str) -> Result<u32, CodecError> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8(field)?;
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(CodecError::Invalid {
            packet: self.packet,
            reason: "variable byte integer longer than 4 bytes",
        })
    }
    fn bin(&mut self, field: &'static str) -> Result<Vec<u8>, CodecError> {
        let n = self.u16(field)? as usize;
        Ok(self.take(n, field)?.to_vec())
    }
    fn string(&mut self, field: &'static str) -> Result<String, CodecError> {
        let n = self.u16(field)? as usize;
        let b = self.take(n, field)?;
        let s = std::str::from_utf8(b).map_err(|_| CodecError::BadUtf8 {
            packet: self.packet,
            field,
        })?;
        if s.contains('\0') {
            return Err(CodecError::Invalid {
                packet: self.packet,
                reason: "string contains U+0000",
            });
        }
        Ok(s.to_owned())
    }
    fn properties(&mut self) -> Result<Properties, CodecError> {
        let len = self.varint("property length")? as usize;
        let body = self.take(len, "properties")?;
        let mut r = Reader::new(body, self.packet);
        let mut props = Properties::default();
        while r.remaining() > 0 {
            let id = r.varint("property identifier")?;
            let id = u8::try_from(id).map_err(|_| CodecError::BadProperty {
                packet: self.packet,
                id: 0xff,
            })?;
            let v = match id {
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                    PropValue::Byte(r.u8("property")?)
                }
                0x13 | 0x21 | 0x22 | 0x23 => PropValue::U16(r.u16("property")?),
                0x02 | 0x11 | 0x18 | 0x27 => PropValue::U32(r.u32("property")?),
                0x0B => PropValue::VarInt(r.varint("property")?),
                0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => {
                    PropValue::Str(r.string("property")?)
                }
                0x09 | 0x16 => PropValue::Bin(r.bin("property")?),
                0x26 => PropValue::Pair(r.string("user property")?, r.string("user property")?),
                _ => {
                    return Err(CodecError::BadProperty {
                        packet: self.packet,
                        id,
                    });
                }
            };
            props.push(id, v);
        }
        Ok(props)
    }
}

/// Result of trying to frame one packet from the front of a buffer.
#[derive(Debug)]
pub enum Framed {
    /// Not enough bytes yet.
    Incomplete,
    /// A whole packet: its first byte, body range, and total length consumed.
    Packet {
        header: u8,
        body_start: usize,
        total: usize,
    },
}

/// Find the boundaries of the first packet in `buf`, enforcing `max_size` on the whole packet
/// before its body has arrived (so an oversized packet is refused without being buffered).
pub fn frame(buf: &[u8], max_size: usize) -> Result<Framed, CodecError> {
    if buf.is_empty() {
        return Ok(Framed::Incomplete);
    }
    let mut len: usize = 0;
    let mut i = 1;
    loop {
        if i > 4 {
            return Err(CodecError::BadRemainingLength);
        }
        let Some(&b) = buf.get(i) else {
            return Ok(Framed::Incomplete);
        };
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    let total = i + len;
    if total > max_size {
        return Err(CodecError::TooLarge {
            size: total,
            limit: max_size,
        });
    }
    if buf.len() < total {
        return Ok(Framed::Incomplete);
    }
    Ok(Framed::Packet {
        header: buf[0],
        body_start: i,
        total,
    })
}

/// Decode one client packet. `version` is `None` until CONNECT has been seen.
pub fn decode(header: u8, body: &[u8], version: Option<Version>) -> Result<Packet, CodecError> {
    let kind = header >> 4;
    let flags = header & 0x0f;
    let v5 = version == Some(Version::V5);
    let expect_flags = |packet: &'static str, want: u8| {
        if flags == want {
            Ok(())
        } else {
            Err(CodecError::BadFlags { packet, flags })
        }
    };
    if version.is_none() && kind != 1 {
        return Err(CodecError::NotConnect(match kind {
            3 => "PUBLISH",
            8 => "SUBSCRIBE",
            12 => "PINGREQ",
            _ => "another packet",
        }));
    }
    match kind {
        1 => {
            expect_flags("CONNECT", 0)?;
            decode_connect(body)
        }
        3 => decode_publish(flags, body, v5),
        4 | 5 | 7 => {
            let name = ["", "", "", "", "PUBACK", "PUBREC", "", "PUBCOMP"][kind as usize];
            expect_flags(name, 0)?;
            let mut r = Reader::new(body, name);
            let pkid = r.u16("packet identifier")?;
            Ok(match kind {
                4 => Packet::PubAck { pkid },
                5 => Packet::PubRec { pkid },
                _ => Packet::PubComp { pkid },
            })
        }
        6 => {
            expect_flags("PUBREL", 2)?;
            let mut r = Reader::new(body, "PUBREL");
            Ok(Packet::PubRel {
                pkid: r.u16("packet identifier")?,
            })
        }
        8 => {
            expect_flags("SUBSCRIBE", 2)?;
            let mut r = Reader::new(body, "SUBSCRIBE");
            let pkid = r.u16("packet identifier")?;
            let properties = if v5 {
                r.properties()?
            } else {
                Properties::default()
            };
            let mut filters = Vec::new();
            while r.remaining() > 0 {
                let f = r.string("topic filter")?;
                let opts = r.u8("subscription options")?;
                if opts & 3 == 3 {
                    return Err(CodecError::BadQos {
                        packet: "SUBSCRIBE",
                    });
                }
                if (!v5 && opts & 0xfc != 0) || (v5 && opts & 0xc0 != 0) {
                    return Err(CodecError::Invalid {
                        packet: "SUBSCRIBE",
                        reason: "reserved bits set in subscription options",
                    });
                }
                filters.push((f, opts));
            }
            if filters.is_empty() {
                return Err(CodecError::Invalid {
                    packet: "SUBSCRIBE",
                    reason: "no topic filters",
                });
            }
            if pkid == 0 {
                return Err(CodecError::Invalid {
                    packet: "SUBSCRIBE",
                    reason: "packet identifier 0",
                });
            }
            Ok(Packet::Subscribe(Subscribe {
                pkid,
                filters,
                properties,
            }))
        }
        10 => {
            expect_flags("UNSUBSCRIBE", 2)?;
            let mut r = Reader::new(body, "UNSUBSCRIBE");
            let pkid = r.u16("packet identifier")?;
            if v5 {
                r.properties()?;
            }
            let mut filters = Vec::new();
            while r.remaining() > 0 {
                filters.push(r.string("topic filter")?);
            }
            if filters.is_empty() {
                return Err(CodecError::Invalid {
                    packet: "UNSUBSCRIBE",
                    reason: "no topic filters",
                });
            }
            Ok(Packet::Unsubscribe { pkid, filters })
        }
        12 => {
            expect_flags("PINGREQ", 0)?;
            Ok(Packet::PingReq)
        }
        14 => {
            expect_flags("DISCONNECT", 0)?;
            let reason = if v5 && !body.is_empty() { body[0] } else { 0 };
            Ok(Packet::Disconnect { reason })
        }
        15 if v5 => Ok(Packet::Auth),
        k => Err(CodecError::BadPacketType(k)),
    }
}

fn decode_connect(body: &[u8]) -> Result<Packet, CodecError> {
    let mut r = Reader::new(body, "CONNECT");
    let name = r.string("protocol name")?;
    if name != "MQTT" {
        return Err(CodecError::BadProtocolName(name));
    }
    let version = match r.u8("protocol level")? {
        4 => Version::V311,
        5 => Version::V5,
        l => return Err(CodecError::BadProtocolLevel(l)),
    };
    let flags = r.u8("connect flags")?;
    if flags & 1 != 0 {
        return Err(CodecError::ReservedConnectFlag);
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 3;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if will_qos == 3 {
        return Err(CodecError::BadQos { packet: "CONNECT" });
    }
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(CodecError::Invalid {
            packet: "CONNECT",
            reason: "will QoS/retain set without will flag",
        });
    }
    if version == Version::V311 && has_password && !has_username {
        return Err(CodecError::Invalid {
            packet: "CONNECT",
            reason: "password flag without username flag",
        });
    }
    let keep_alive = r.u16("keep alive")?;
    let properties = if version == Version::V5 {
        r.properties()?
    } else {
        Properties::default()
    };
    let client_id = r.string("client identifier")?;
    let will = if will_flag {
        if version == Version::V5 {
            r.properties()?;
        }
        let topic = r.string("will topic")?;
        let payload = r.bin("will payload")?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string("user name")?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.bin("password")?)
    } else {
        None
    };
    if r.remaining() != 0 {
        return Err(CodecError::Invalid {
            packet: "CONNECT",
            reason: "trailing bytes after payload",
        });
    }
    Ok(Packet::Connect(Connect {
        version,
        client_id,
        clean_start,
        keep_alive,
        username,
        password,
        will,
        properties,
    }))
}

fn decode_publish(flags: u8, body: &[u8], v5: bool) -> Result<Packet, CodecError> {
    let qos = (flags >> 1) & 3;
    if qos == 3 {
        return Err(CodecError::BadQos { packet: "PUBLISH" });
    }
    let dup = flags & 8 != 0;
    if qos == 0 && dup {
        return Err(CodecError::Invalid {
            packet: "PUBLISH",
            reason: "DUP set on a QoS 0 message",
        });
    }
    let mut r = Reader::new(body, "PUBLISH");
    let topic = r.string("topic name")?;
    let pkid = if qos > 0 {
        let p = r.u16("packet identifier")?;
        if p == 0 {
            return Err(CodecError::Invalid {
                packet: "PUBLISH",
                reason: "packet identifier 0",
            });
        }
        p
    } else {
        0
    };
    let properties = if v5 {
        r.properties()?
    } else {
        Properties::default()
    };
    let payload = body[r.pos..].to_vec();
    Ok(Packet::Publish(Publish {
        dup,
        qos,
        retain: flags & 1 != 0,
        topic,
        pkid,
        properties,
        payload,
    }))
}

/// Encoder for server→client packets.
pub struct Encoder {
    pub version: Version,
}

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let mut b = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            b |= 0x80;
        }
        out.push(b);
        if v == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bin(out, s.as_bytes());
}

fn put_bin(out: &mut Vec<u8>, b: &[u8]) {
    let n = u16::try_from(b.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(&b[..n as usize]);
}

fn put_props(out: &mut Vec<u8>, props: &Properties) {
    let mut body = Vec::new();
    for (id, v) in &props.0 {
        put_varint(&mut body, usize::from(*id));
        match v {
            PropValue::Byte(b) => body.push(*b),
            PropValue::U16(x) => body.extend_from_slice(&x.to_be_bytes()),
            PropValue::U32(x) => body.extend_from_slice(&x.to_be_bytes()),
            PropValue::VarInt(x) => put_varint(&mut body, *x as usize),
            PropValue::Str(s) => put_str(&mut body, s),
            PropValue::Bin(b) => put_bin(&mut body, b),
            PropValue::Pair(k, v) => {
                put_str(&mut body, k);
                put_str(&mut body, v);
            }
        }
    }
    put_varint(out, body.len());
    out.extend_from_slice(&body);
}

fn finish(header: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(header);
    put_varint(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

impl Encoder {
    fn v5(&self) -> bool {
        self.version == Version::V5
    }

    /// CONNACK. For 3.1.1 the code is a 3.1.1 return code; for 5 a reason code.
    pub fn connack(&self, session_present: bool, code: u8, props: &Properties) -> Vec<u8> {
        let mut b = vec![u8::from(session_present), code];
        if self.v5() {
            put_props(&mut b, props);
        }
        finish(0x20, b)
    }

    pub fn publish(&self, p: &Publish) -> Vec<u8> {
        let mut b = Vec::with_capacity(p.topic.len() + p.payload.len() + 8);
        put_str(&mut b, &p.topic);
        if p.qos > 0 {
            b.extend_from_slice(&p.pkid.to_be_bytes());
        }
        if self.v5() {
            put_props(&mut b, &p.properties);
        }
        b.extend_from_slice(&p.payload);
        let header = 0x30 | (u8::from(p.dup) << 3) | (p.qos << 1) | u8::from(p.retain);
        finish(header, b)
    }

    pub fn puback(&self, pkid: u16, reason: u8) -> Vec<u8> {
        let mut b = pkid.to_be_bytes().to_vec();
        if self.v5() && reason != 0 {
            b.push(reason);
        }
        finish(0x40, b)
    }

    pub fn suback(&self, pkid: u16, codes: &[u8]) -> Vec<u8> {
        let mut b = pkid.to_be_bytes().to_vec();
        if self.v5() {
            put_props(&mut b, &Properties::default());
        }
        b.extend_from_slice(codes);
        finish(0x90, b)
    }

    pub fn unsuback(&self, pkid: u16, count: usize) -> Vec<u8> {
        let mut b = pkid.to_be_bytes().to_vec();
        if self.v5() {
            put_props(&mut b, &Properties::default());
            b.extend(std::iter::repeat_n(0u8, count));
        }
        finish(0xb0, b)
    }

    pub fn pingresp(&self) -> Vec<u8> {
        vec![0xd0, 0]
    }

    /// Server-sent DISCONNECT exists only in MQTT 5; for 3.1.1 this returns `None`.
    pub fn disconnect(&self, reason: u8, reason_string: &str) -> Option<Vec<u8>> {
        if !self.v5() {
            return None;
        }
        let mut props = Properties::default();
        if !reason_string.is_empty() {
            props.push(
                prop::REASON_STRING,
                PropValue::Str(reason_string.to_owned()),
            );
        }
        let mut b = vec![reason];
        put_props(&mut b, &props);
        Some(finish(0xe0, b))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5",
        })
    }
}

/// Validate a topic name used in PUBLISH: non-empty, no wildcards.
pub fn valid_topic(t: &str) -> bool {
    !t.is_empty() && !t.contains(['+', '#'])
}

/// Validate a topic filter: `#` only last and alone in its level, `+` alone in its level.
pub fn valid_filter(f: &str) -> bool {
    if f.is_empty() {
        return false;
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i != levels.len() - 1) {
            return false;
        }
        if l.contains('+') && *l != "+" {
            return false;
        }
    }
    true
}

/// MQTT topic matching with AWS's rule that `#` does not match the parent level, and that
/// wildcards at the first level do not match topics beginning with `$`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), Some(_)) => return true,
            (Some("#"), None) => return false,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn connect_bytes(level: u8, client: &str, user: Option<&str>) -> Vec<u8> {
        let mut b = Vec::new();
        put_str(&mut b, "MQTT");
        b.push(level);
        b.push(0x02 | if user.is_some() { 0x80 } else { 0 });
        b.extend_from_slice(&30u16.to_be_bytes());
        if level == 5 {
            put_props(&mut b, &Properties::default());
        }
        put_str(&mut b, client);
        if let Some(u) = user {
            put_str(&mut b, u);
        }
        finish(0x10, b)
    }

    fn decode_all(bytes: &[u8], v: Option<Version>) -> Result<Packet, CodecError> {
        match frame(bytes, 1 << 20)? {
            Framed::Packet {
                header,
                body_start,
                total,
            } => decode(header, &bytes[body_start..total], v),
            Framed::Incomplete => panic!("incomplete"),
        }
    }

    #[test]
    fn decodes_sdk_style_connect() {
        let p = decode_all(
            &connect_bytes(4, "dev-1", Some("?SDK=PythonV2&Version=1.31.0")),
            None,
        )
        .unwrap();
        let Packet::Connect(c) = p else { panic!() };
        assert_eq!(c.client_id, "dev-1");
        assert_eq!(c.version, Version::V311);
        assert_eq!(c.username.as_deref(), Some("?SDK=PythonV2&Version=1.31.0"));
        assert!(c.password.is_none());
        let Packet::Connect(c) = decode_all(&connect_bytes(5, "x", None), None).unwrap() else {
            panic!()
        };
        assert_eq!(c.version, Version::V5);
    }

    #[test]
    fn rejects_bad_connects_by_name() {
        let mut b = connect_bytes(3, "x", None);
        assert_eq!(
            decode_all(&b, None).unwrap_err(),
            CodecError::BadProtocolLevel(3)
        );
        b = connect_bytes(4, "x", None);
        b[9] |= 1;
        assert_eq!(
            decode_all(&b, None).unwrap_err(),
            CodecError::ReservedConnectFlag
        );
        let publish = finish(0x30, vec![0, 1, b'a']);
        assert_eq!(
            decode_all(&publish, None).unwrap_err(),
            CodecError::NotConnect("PUBLISH")
        );
    }

    #[test]
    fn frame_limits_before_body_arrives() {
        // Header claims 200 000 bytes; only 3 are present.
        let mut b = vec![0x30];
        put_varint(&mut b, 200_000);
        assert!(matches!(
            frame(&b, 131_072 + 1024),
            Err(CodecError::TooLarge { .. })
        ));
        assert!(matches!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], 1 << 30),
            Err(CodecError::BadRemainingLength)
        ));
        assert!(matches!(frame(&[0x30, 0x80], 100), Ok(Framed::Incomplete)));
    }

    #[test]
    fn publish_roundtrip_v5_with_properties() {
        let mut props = Properties::default();
        props.push(prop::CONTENT_TYPE, PropValue::Str("json".into()));
        props.push(prop::USER_PROPERTY, PropValue::Pair("k".into(), "v".into()));
        let p = Publish {
            dup: false,
            qos: 1,
            retain: false,
            topic: "a/b".into(),
            pkid: 7,
            properties: props,
            payload: b"hi".to_vec(),
        };
        let bytes = Encoder {
            version: Version::V5,
        }
        .publish(&p);
        assert_eq!(
            decode_all(&bytes, Some(Version::V5)).unwrap(),
            Packet::Publish(p)
        );
    }

    #[test]
    fn topic_matching_follows_aws() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(!filter_matches("a/#", "a"), "AWS: # does not match parent");
        assert!(!filter_matches("#", "$aws/things/x"));
        assert!(filter_matches("$aws/things/+", "$aws/things/x"));
        assert!(!filter_matches("a/b", "a/b/c"));
        assert!(valid_filter("a/+/#"));
        assert!(!valid_filter("a/#/b"));
        assert!(!valid_filter("a/b+"));
        assert!(!valid_topic("a/+"));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(header in proptest::num::u8::ANY, body in proptest::collection::vec(proptest::num::u8::ANY, 0..200), v5 in proptest::bool::ANY) {
            let v = if v5 { Version::V5 } else { Version::V311 };
            let _ = decode(header, &body, Some(v));
            let _ = decode(header, &body, None);
        }
    }
}
