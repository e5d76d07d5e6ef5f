//! GGUF (v2/v3) files: a bounds-checked reader over a memory map, and a writer
//! (used by the synthetic model and by tests).

mod reader;
mod types;
mod writer;

pub use reader::{GgufError, GgufFile, TensorInfo, parse_header};
pub use types::{GgmlType, MetaValue, SUPPORTED_TYPES, ValueType};
pub use writer::GgufWriter;

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
