//! Register decoding and encoding: pure, no I/O.
//!
//! Words arrive in wire order. `word_order` says which word is most significant for types wider
//! than one register; `byte_order` says which byte of each register comes first. Modbus itself
//! is big/big; many devices swap words ("little" word order, e.g. CDAB floats).

use serde::{Deserialize, Serialize};

use gatewayd_plugin::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Int16,
    Uint16,
    Int32,
    Uint32,
    Float32,
    Float64,
    Bool,
    String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    #[default]
    Big,
    Little,
}

/// How a value lies in registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub data_type: DataType,
    pub byte_order: Order,
    pub word_order: Order,
    /// Registers a string occupies (two characters each); ignored for other types.
    pub string_registers: u16,
}

impl Layout {
    /// Registers (or bits, for `Bool` read from coils) the value occupies.
    pub fn registers(&self) -> u16 {
        match self.data_type {
            DataType::Int16 | DataType::Uint16 | DataType::Bool => 1,
            DataType::Int32 | DataType::Uint32 | DataType::Float32 => 2,
            DataType::Float64 => 4,
            DataType::String => self.string_registers,
        }
    }
}

/// A value before scale and offset.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("expected {want} registers, got {got}")]
    Length { want: usize, got: usize },
    #[error("{0}")]
    Value(String),
}

/// Words → big-endian bytes of the value, applying word and byte order.
fn to_be_bytes(words: &[u16], layout: &Layout) -> Vec<u8> {
    let mut ordered: Vec<u16> = words.to_vec();
    if layout.word_order == Order::Little {
        ordered.reverse();
    }
    ordered
        .iter()
        .flat_map(|w| {
            let b = w.to_be_bytes();
            match layout.byte_order {
                Order::Big => b,
                Order::Little => [b[1], b[0]],
            }
        })
        .collect()
}

/// Big-endian bytes of the value → words in wire order (inverse of `to_be_bytes`).
fn from_be_bytes(bytes: &[u8], layout: &Layout) -> Vec<u16> {
    let mut words: Vec<u16> = bytes
        .chunks(2)
        .map(|c| {
            let (hi, lo) = (c[0], c.get(1).copied().unwrap_or(0));
            match layout.byte_order {
                Order::Big => u16::from_be_bytes([hi, lo]),
                Order::Little => u16::from_be_bytes([lo, hi]),
            }
        })
        .collect();
    if layout.word_order == Order::Little {
        words.reverse();
    }
    words
}

/// Decodes registers read for one point.
pub fn decode(words: &[u16], layout: &Layout) -> Result<Raw, DecodeError> {
    let want = usize::from(layout.registers());
    if words.len() != want {
        return Err(DecodeError::Length {
            want,
            got: words.len(),
        });
    }
    let b = to_be_bytes(words, layout);
    let arr = |n: usize| -> [u8; 8] {
        let mut a = [0u8; 8];
        a[8 - n..].copy_from_slice(&b[..n]);
        a
    };
    Ok(match layout.data_type {
        DataType::Int16 => Raw::Int(i64::from(i16::from_be_bytes([b[0], b[1]]))),
        DataType::Uint16 => Raw::Int(i64::from(u16::from_be_bytes([b[0], b[1]]))),
        DataType::Int32 => Raw::Int(i64::from(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::Uint32 => Raw::Int(i64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::Float32 => Raw::Float(f64::from(f32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
        DataType::Float64 => Raw::Float(f64::from_be_bytes(arr(8))),
        DataType::Bool => Raw::Bool(words[0] != 0),
        DataType::String => {
            // Strings read in register order whatever the word order; only bytes may be swapped.
            let bytes = to_be_bytes(
                words,
                &Layout {
                    word_order: Order::Big,
                    ..*layout
                },
            );
            let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
            Raw::Text(
                String::from_utf8_lossy(&bytes[..end])
                    .trim_end()
                    .to_string(),
            )
        }
    })
}

/// Encodes a raw value into registers for one point. Refuses values the type cannot hold.
pub fn encode(raw: &Raw, layout: &Layout) -> Result<Vec<u16>, DecodeError> {
    let out_of_range = |v: &dyn std::fmt::Debug| {
        DecodeError::Value(format!("{v:?} does not fit {:?}", layout.data_type))
    };
    let int = |r: &Raw| -> Result<i64, DecodeError> {
        match r {
            Raw::Int(i) => Ok(*i),
            Raw::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(*f as i64),
            Raw::Bool(b) => Ok(i64::from(*b)),
            other => Err(DecodeError::Value(format!(
                "{other:?} is not an integer for {:?}",
                layout.data_type
            ))),
        }
    };
    let float = |r: &Raw| -> Result<f64, DecodeError> {
        match r {
            Raw::Int(i) => Ok(*i as f64),
            Raw::Float(f) => Ok(*f),
            other => Err(DecodeError::Value(format!(
                "{other:?} is not a number for {:?}",
                layout.data_type
            ))),
        }
    };
    let bytes: Vec<u8> = match layout.data_type {
        DataType::Int16 => {
            let v = int(raw)?;
            i16::try_from(v)
                .map_err(|_| out_of_range(&v))?
                .to_be_bytes()
                .to_vec()
        }
        DataType::Uint16 => {
            let v = int(raw)?;
            u16::try_from(v)
                .map_err(|_| out_of_range(&v))?
                .to_be_bytes()
                .to_vec()
        }
        DataType::Int32 => {
            let v = int(raw)?;
            i32::try_from(v)
                .map_err(|_| out_of_range(&v))?
                .to_be_bytes()
                .to_vec()
        }
        DataType::Uint32 => {
            let v = int(raw)?;
            u32::try_from(v)
                .map_err(|_| out_of_range(&v))?
                .to_be_bytes()
                .to_vec()
        }
        DataType::Float32 => {
            let v = float(raw)?;
            if v.is_finite() && v.abs() > f64::from(f32::MAX) {
                return Err(out_of_range(&v));
            }
            (v as f32).to_be_bytes().to_vec()
        }
        DataType::Float64 => float(raw)?.to_be_bytes().to_vec(),
        DataType::Bool => match raw {
            Raw::Bool(b) => vec![0, u8::from(*b)],
            other => {
                return Err(DecodeError::Value(format!("{other:?} is not a bool")));
            }
        },
        DataType::String => {
            let Raw::Text(s) = raw else {
                return Err(DecodeError::Value(format!("{raw:?} is not a string")));
            };
            let cap = usize::from(layout.string_registers) * 2;
            if s.len() > cap || s.as_bytes().contains(&0) {
                return Err(DecodeError::Value(format!(
                    "string of {} bytes does not fit {cap} bytes",
                    s.len()
                )));
            }
            let mut b = s.as_bytes().to_vec();
            b.resize(cap, 0);
            let l = Layout {
                word_order: Order::Big,
                ..*layout
            };
            return Ok(from_be_bytes(&b, &l));
        }
    };
    Ok(from_be_bytes(&bytes, layout))
}

/// Applies scale and offset: `value = raw * scale + offset`. Without either, integers stay
/// integers.
pub fn scaled(raw: Raw, scale: Option<f64>, offset: Option<f64>) -> Value {
    match raw {
        Raw::Bool(b) => Value::Bool(b),
        Raw::Text(t) => Value::Text(t),
        Raw::Int(i) if scale.is_none() && offset.is_none() => Value::Int(i),
        Raw::Int(i) => Value::Float(i as f64 * scale.unwrap_or(1.0) + offset.unwrap_or(0.0)),
        Raw::Float(f) => Value::Float(f * scale.unwrap_or(1.0) + offset.unwrap_or(0.0)),
    }
}

/// The inverse of `scaled`, for writes: `raw = (value - offset) / scale`, rounded for integer
/// types.
pub fn unscaled(
    value: &Value,
    layout: &Layout,
    scale: Option<f64>,
    offset: Option<f64>,
) -> Result<Raw, DecodeError> {
    let integer = matches!(
        layout.data_type,
        DataType::Int16 | DataType::Uint16 | DataType::Int32 | DataType::Uint32
    );
    match value {
        Value::Bool(b) => Ok(Raw::Bool(*b)),
        Value::Text(t) => Ok(Raw::Text(t.clone())),
        Value::Int(i) if scale.is_none() && offset.is_none() => Ok(Raw::Int(*i)),
        Value::Int(_) | Value::Float(_) => {
            let v = match value {
                Value::Int(i) => *i as f64,
                Value::Float(f) => *f,
                _ => 0.0,
            };
            let s = scale.unwrap_or(1.0);
            if s == 0.0 {
                return Err(DecodeError::Value("scale is 0".into()));
            }
            let r = (v - offset.unwrap_or(0.0)) / s;
            if !r.is_finite() {
                return Err(DecodeError::Value(format!("{v} is not finite")));
            }
            if integer {
                let r = r.round();
                if r.abs() >= 9.0e15 {
                    return Err(DecodeError::Value(format!("{v} is out of range")));
                }
                Ok(Raw::Int(r as i64))
            } else {
                Ok(Raw::Float(r))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn l(t: DataType, b: Order, w: Order) -> Layout {
        Layout {
            data_type: t,
            byte_order: b,
            word_order: w,
            string_registers: 4,
        }
    }

    #[test]
    fn known_encodings() {
        use DataType::*;
        use Order::*;
        assert_eq!(decode(&[0xFFFE], &l(Int16, Big, Big)), Ok(Raw::Int(-2)));
        assert_eq!(decode(&[0xFFFE], &l(Uint16, Big, Big)), Ok(Raw::Int(65534)));
        assert_eq!(
            decode(&[0x0001, 0x0002], &l(Uint32, Big, Big)),
            Ok(Raw::Int(0x0001_0002))
        );
        assert_eq!(
            decode(&[0x0002, 0x0001], &l(Uint32, Big, Little)),
            Ok(Raw::Int(0x0001_0002))
        );
        // 123.456f32 = 0x42F6E979: ABCD, CDAB (word swap), BADC (byte swap), DCBA.
        let f = Raw::Float(f64::from(123.456f32));
        assert_eq!(
            decode(&[0x42F6, 0xE979], &l(Float32, Big, Big)),
            Ok(f.clone())
        );
        assert_eq!(
            decode(&[0xE979, 0x42F6], &l(Float32, Big, Little)),
            Ok(f.clone())
        );
        assert_eq!(
            decode(&[0xF642, 0x79E9], &l(Float32, Little, Big)),
            Ok(f.clone())
        );
        assert_eq!(
            decode(&[0x79E9, 0xF642], &l(Float32, Little, Little)),
            Ok(f)
        );
        assert_eq!(
            decode(&[0x4142, 0x4300, 0, 0], &l(String, Big, Big)),
            Ok(Raw::Text("ABC".into()))
        );
        assert_eq!(
            decode(&[0x4241, 0x0043, 0, 0], &l(String, Little, Little)),
            Ok(Raw::Text("ABC".into()))
        );
        assert_eq!(
            decode(&[0, 0], &l(Int16, Big, Big)),
            Err(DecodeError::Length { want: 1, got: 2 })
        );
    }

    #[test]
    fn scale_and_offset() {
        assert_eq!(
            scaled(Raw::Int(215), Some(0.1), Some(-10.0)),
            Value::Float(215.0 * 0.1 - 10.0)
        );
        assert_eq!(scaled(Raw::Int(7), None, None), Value::Int(7));
        let lay = l(DataType::Int16, Order::Big, Order::Big);
        assert_eq!(
            unscaled(&Value::Float(11.5), &lay, Some(0.1), Some(-10.0)),
            Ok(Raw::Int(215))
        );
        assert!(encode(&Raw::Int(40000), &lay).is_err());
        assert!(encode(&Raw::Text("x".into()), &lay).is_err());
    }

    fn any_layout() -> impl Strategy<Value = Layout> {
        let t = prop_oneof![
            Just(DataType::Int16),
            Just(DataType::Uint16),
            Just(DataType::Int32),
            Just(DataType::Uint32),
            Just(DataType::Float32),
            Just(DataType::Float64),
            Just(DataType::Bool),
            Just(DataType::String),
        ];
        let o = || prop_oneof![Just(Order::Big), Just(Order::Little)];
        (t, o(), o(), 1u16..8).prop_map(|(data_type, byte_order, word_order, n)| Layout {
            data_type,
            byte_order,
            word_order,
            string_registers: n,
        })
    }

    proptest! {
        /// Any registers that decode re-encode to the same registers (strings: up to the first
        /// NUL; bools: canonical 0/1; floats: NaN payloads aside).
        #[test]
        fn decode_encode_round_trip(layout in any_layout(), words in proptest::collection::vec(any::<u16>(), 8)) {
            let words = &words[..usize::from(layout.registers())];
            let raw = decode(words, &layout).expect("right length decodes");
            if let Raw::Float(f) = raw && f.is_nan() { return Ok(()); }
            // Bytes that are not UTF-8 decode lossily and may not fit back: not a round trip.
            let Ok(back) = encode(&raw, &layout) else {
                prop_assume!(layout.data_type == DataType::String);
                return Ok(());
            };
            let again = decode(&back, &layout).expect("encoded value decodes");
            prop_assert_eq!(&again, &raw);
            match layout.data_type {
                DataType::String | DataType::Bool => {}
                _ => prop_assert_eq!(back.as_slice(), words),
            }
        }

        #[test]
        fn encode_decode_round_trip_int32(v in any::<i32>(), b in any::<bool>(), w in any::<bool>()) {
            let o = |x| if x { Order::Little } else { Order::Big };
            let lay = l(DataType::Int32, o(b), o(w));
            let words = encode(&Raw::Int(i64::from(v)), &lay).expect("fits");
            prop_assert_eq!(decode(&words, &lay), Ok(Raw::Int(i64::from(v))));
        }
    }
}
