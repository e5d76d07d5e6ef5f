//! GGUF value types and ggml tensor types.

/// Metadata value types, as numbered by the GGUF spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    /// The fewest bytes a value of this type takes in a file (an empty string: its
    /// length; an empty array: its element type and count).
    pub fn min_encoded_len(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }

    pub fn from_u32(v: u32) -> Option<Self> {
        use ValueType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn value_type(&self) -> ValueType {
        match self {
            MetaValue::U8(_) => ValueType::U8,
            MetaValue::I8(_) => ValueType::I8,
            MetaValue::U16(_) => ValueType::U16,
            MetaValue::I16(_) => ValueType::I16,
            MetaValue::U32(_) => ValueType::U32,
            MetaValue::I32(_) => ValueType::I32,
            MetaValue::F32(_) => ValueType::F32,
            MetaValue::Bool(_) => ValueType::Bool,
            MetaValue::String(_) => ValueType::String,
            MetaValue::Array(_) => ValueType::Array,
            MetaValue::U64(_) => ValueType::U64,
            MetaValue::I64(_) => ValueType::I64,
            MetaValue::F64(_) => ValueType::F64,
        }
    }

    /// Any integer type as u64, if non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            MetaValue::F32(v) => Some(v),
            MetaValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A ggml tensor element type, as GGUF numbers it (llama.cpp's `enum ggml_type`).
///
/// Every number ggml has assigned is named, whether sampo can compute with it or not
/// ([`GgmlType::is_supported`]); a number ggml has not assigned (or that is newer than
/// this table) is kept as [`GgmlType::Unknown`], so that a file is always readable and
/// only running it is refused, naming the type.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    /// A type number with no name here (removed from ggml, or newer than this table).
    Unknown(u32),
}

/// (type, number, name, elements per block, bytes per block): ggml's `type_traits`
/// (ggml/src/ggml.c), for every type a GGUF file may hold. Q8_1 is 36 bytes as
/// ggml-common.h asserts (gguf-py's table says 40, a leftover of f32 scales). Numbers 4, 5 (Q4_2, Q4_3)
/// and 31..=33, 36..=38 (repacked Q4_0/IQ4_NL) were removed from ggml and never
/// appear in GGUF files.
const TABLE: &[(GgmlType, u32, &str, usize, usize)] = &[
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q8_1, 9, "Q8_1", 32, 36),
    (GgmlType::Q2_K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3_K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4_K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5_K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6_K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8_K, 15, "Q8_K", 256, 292),
    (GgmlType::IQ2_XXS, 16, "IQ2_XXS", 256, 66),
    (GgmlType::IQ2_XS, 17, "IQ2_XS", 256, 74),
    (GgmlType::IQ3_XXS, 18, "IQ3_XXS", 256, 98),
    (GgmlType::IQ1_S, 19, "IQ1_S", 256, 50),
    (GgmlType::IQ4_NL, 20, "IQ4_NL", 32, 18),
    (GgmlType::IQ3_S, 21, "IQ3_S", 256, 110),
    (GgmlType::IQ2_S, 22, "IQ2_S", 256, 82),
    (GgmlType::IQ4_XS, 23, "IQ4_XS", 256, 136),
    (GgmlType::I8, 24, "I8", 1, 1),
    (GgmlType::I16, 25, "I16", 1, 2),
    (GgmlType::I32, 26, "I32", 1, 4),
    (GgmlType::I64, 27, "I64", 1, 8),
    (GgmlType::F64, 28, "F64", 1, 8),
    (GgmlType::IQ1_M, 29, "IQ1_M", 256, 56),
    (GgmlType::BF16, 30, "BF16", 1, 2),
    (GgmlType::TQ1_0, 34, "TQ1_0", 256, 54),
    (GgmlType::TQ2_0, 35, "TQ2_0", 256, 66),
    (GgmlType::MXFP4, 39, "MXFP4", 32, 17),
    (GgmlType::NVFP4, 40, "NVFP4", 64, 36),
    (GgmlType::Q1_0, 41, "Q1_0", 128, 18),
];

/// Types sampo computes with, on every backend.
pub const SUPPORTED_TYPES: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

impl GgmlType {
    fn entry(self) -> Option<&'static (GgmlType, u32, &'static str, usize, usize)> {
        TABLE.iter().find(|e| e.0 == self)
    }

    /// The type with GGUF number `v`; [`GgmlType::Unknown`] for a number ggml has not named.
    pub fn from_u32(v: u32) -> Self {
        TABLE.iter().find(|e| e.1 == v).map_or(Self::Unknown(v), |e| e.0)
    }

    pub fn to_u32(self) -> u32 {
        match self {
            Self::Unknown(v) => v,
            t => t.entry().map_or(u32::MAX, |e| e.1),
        }
    }

    /// Elements and bytes per block, if ggml defines the type.
    pub fn layout(self) -> Option<(usize, usize)> {
        self.entry().map(|e| (e.3, e.4))
    }

    /// Elements per block (1 for a type of unknown layout).
    pub fn block_len(self) -> usize {
        self.layout().map_or(1, |l| l.0)
    }

    /// Bytes per block (0 for a type of unknown layout).
    pub fn block_bytes(self) -> usize {
        self.layout().map_or(0, |l| l.1)
    }

    /// Whether sampo's backends compute with this type.
    pub fn is_supported(self) -> bool {
        SUPPORTED_TYPES.contains(&self)
    }

    /// Block-quantized types sampo supports: their dot products use quantized
    /// activations (`quant::Q8Act`), one 32-element chunk at a time.
    pub fn is_quantized(self) -> bool {
        self.is_supported() && self.block_len() >= 32
    }

    /// The K-quants: super-blocks of 256 elements, eight 32-element chunks each.
    pub fn is_k_quant(self) -> bool {
        matches!(self, Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K)
    }

    /// ggml's name, or `?` for an unknown number.
    pub fn name(self) -> &'static str {
        self.entry().map_or("?", |e| e.2)
    }

    /// The name with its number, as errors and `sampo model inspect` show it:
    /// `IQ2_XXS (type 16)`, or `unknown type 77`.
    pub fn describe(self) -> String {
        match self {
            Self::Unknown(v) => format!("unknown type {v}"),
            t => format!("{} (type {})", t.name(), t.to_u32()),
        }
    }

    /// Bytes for `n` elements, or `None` if the layout is unknown, `n` is not a whole
    /// number of blocks or the size does not fit in a `u64`.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let (bl, bb) = self.layout()?;
        let bl = bl as u64;
        if !n.is_multiple_of(bl) {
            return None;
        }
        (n / bl).checked_mul(bb as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unknown(v) => write!(f, "type {v}"),
            t => f.write_str(t.name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_names_are_unique() {
        for e in TABLE {
            assert_eq!(GgmlType::from_u32(e.1), e.0);
            assert_eq!(e.0.to_u32(), e.1);
            assert_eq!(TABLE.iter().filter(|o| o.2 == e.2 || o.1 == e.1).count(), 1, "{}", e.2);
        }
        assert_eq!(GgmlType::from_u32(4), GgmlType::Unknown(4));
        assert_eq!(GgmlType::Unknown(77).to_u32(), 77);
        assert_eq!(GgmlType::IQ2_XXS.describe(), "IQ2_XXS (type 16)");
        assert_eq!(GgmlType::Unknown(77).describe(), "unknown type 77");
        assert!(GgmlType::Q6_K.is_supported() && !GgmlType::IQ2_XXS.is_supported());
        assert_eq!(GgmlType::Unknown(77).bytes_for(256), None);
    }
}
