//! Every CUDA kernel compiles with NVRTC 13.0 (the PyPI package
//! `nvidia-cuda-nvrtc==13.0.88`, which scripts/setup.sh installs; the lent GPUs run
//! CUDA 13.0 drivers), for Hopper, with the determinism options, and without a single
//! warning. Runs everywhere: no GPU or CUDA toolkit is needed.

use std::path::PathBuf;

use sampo_kernels::cuda::{COMMON_HEADER, SOURCES, compile_options, nvrtc::Nvrtc};

fn nvrtc_path() -> PathBuf {
    if let Ok(p) = std::env::var("SAMPO_NVRTC") {
        return PathBuf::from(p);
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import nvidia, os; print(list(nvidia.__path__)[0])"])
        .output()
        .expect("python3");
    let base = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    for candidate in ["cu13/lib/libnvrtc.so.13", "cuda_nvrtc/lib/libnvrtc.so.13"] {
        let p = base.join(candidate);
        if p.exists() {
            return p;
        }
    }
    panic!("libnvrtc.so.13 not found under {}: run scripts/setup.sh (pip nvidia-cuda-nvrtc==13.0.88)", base.display());
}

#[test]
fn every_kernel_compiles_without_warnings() {
    let nvrtc = Nvrtc::load(&nvrtc_path()).expect("load NVRTC");
    let version = nvrtc.version().expect("version");
    assert_eq!(version, (13, 0), "the lent GPUs' driver runs CUDA 13.0 PTX");
    for arch in ["compute_90"] {
        for (name, src) in SOURCES {
            let out =
                nvrtc.compile(name, src, &[COMMON_HEADER], &compile_options(arch)).unwrap_or_else(|e| panic!("{e}"));
            assert!(out.log.is_empty(), "{name} ({arch}) compiled with warnings:\n{}", out.log);
            assert!(out.ptx.contains(".entry"), "{name}: no kernel entry in the PTX");
            // --fmad=false: no fused multiply-add may appear in the PTX.
            assert!(!out.ptx.contains("fma.rn.f32"), "{name}: an FMA slipped into the PTX");
        }
    }
}

#[test]
fn a_broken_kernel_is_a_typed_error_with_the_log() {
    let nvrtc = Nvrtc::load(&nvrtc_path()).expect("load NVRTC");
    let err = nvrtc
        .compile("broken.cu", "extern \"C\" __global__ void k() { undeclared(); }", &[], &compile_options("compute_90"))
        .expect_err("must not compile");
    assert!(err.to_string().contains("undeclared"), "{err}");
}

#[test]
fn missing_driver_is_a_reason_not_a_panic() {
    // This machine class has no GPU; where one exists this just reports it.
    match sampo_kernels::cuda::detect::probe() {
        Ok(info) => eprintln!("CUDA device found: {info:?}"),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

#[test]
fn ptx_is_cached_by_source_and_architecture_and_names_every_kernel() {
    use sampo_kernels::cuda::Kernel;
    use sampo_kernels::cuda::driver::{CudaOptions, kernels_ptx};
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = CudaOptions { nvrtc: Some(nvrtc_path()), ptx_cache: Some(dir.path().to_path_buf()) };
    let (ptx, first) = kernels_ptx("compute_90", &opts).expect("compile");
    assert_eq!((first.compiled, first.cached), (SOURCES.len(), 0), "{first:?}");
    // Every kernel the backend launches is an entry of the file it is looked up in.
    for k in Kernel::ALL {
        let (_, text) = ptx.iter().find(|(f, _)| *f == k.file()).expect("file compiled");
        assert!(text.contains(&format!(".entry {}(", k.name())), "{} not in {}", k.name(), k.file());
    }
    let (_, second) = kernels_ptx("compute_90", &opts).expect("from cache");
    assert_eq!((second.compiled, second.cached), (0, SOURCES.len()), "{second:?}");
    assert_eq!(first.cache_key, second.cache_key);
    // Another architecture is another entry; a damaged file is compiled again.
    let (_, other) = kernels_ptx("compute_80", &opts).expect("compile for sm_80");
    assert_eq!(other.compiled, SOURCES.len());
    let entry = dir.path().join(format!("compute_90-{}", first.cache_key)).join("quant.cu.ptx");
    std::fs::write(&entry, "garbage").expect("damage");
    let (_, third) = kernels_ptx("compute_90", &opts).expect("recompile");
    assert_eq!((third.compiled, third.cached), (1, SOURCES.len() - 1), "{third:?}");
}

/// The body of each `.entry` in a PTX text: (kernel name, text up to the next entry).
fn entries(ptx: &str) -> Vec<(&str, &str)> {
    let starts: Vec<usize> = ptx.match_indices(".entry ").map(|(i, _)| i).collect();
    starts
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            let body = &ptx[i..starts.get(k + 1).copied().unwrap_or(ptx.len())];
            let name = body[".entry ".len()..].split('(').next().unwrap_or("").trim();
            (name, body)
        })
        .collect()
}

#[test]
fn no_kernel_uses_local_memory() {
    // A runtime-indexed local array (or a spill) turns into `.local` loads and stores:
    // per-thread memory traffic, in the matrix products' case in the innermost loop of
    // the hottest kernel. Every kernel, the matrix products first, must compile to
    // registers only.
    let nvrtc = Nvrtc::load(&nvrtc_path()).expect("load NVRTC");
    let mut checked = Vec::new();
    for (name, src) in SOURCES {
        let out = nvrtc.compile(name, src, &[COMMON_HEADER], &compile_options("compute_90")).expect("compile");
        for (kernel, body) in entries(&out.ptx) {
            let lines: Vec<&str> = body.lines().filter(|l| l.contains(".local")).take(4).collect();
            assert!(lines.is_empty(), "{kernel} ({name}) uses local memory:\n{}", lines.join("\n"));
            checked.push(kernel.to_owned());
        }
    }
    // Every quantized type the CPU backend multiplies has its own kernel, and it is there.
    use sampo_kernels::cuda::Kernel;
    use sampo_kernels::gguf::SUPPORTED_TYPES;
    for ty in SUPPORTED_TYPES.into_iter().filter(|t| t.is_quantized()) {
        let k = Kernel::matmul_q(ty).unwrap_or_else(|| panic!("no matrix product kernel for {ty}"));
        assert!(checked.iter().any(|c| c == k.name()), "{} missing from the PTX ({checked:?})", k.name());
    }
}

/// `(name, bits)` of every `#define SAMPO_<name> __int_as_float(0x<bits>)` in `text`.
fn header_constants(text: &str) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("").trim();
        let Some(rest) = code.strip_prefix("#define SAMPO_") else { continue };
        let Some((name, value)) = rest.split_once(char::is_whitespace) else { continue };
        let Some(hex) = value.trim().strip_prefix("__int_as_float(0x").and_then(|v| v.strip_suffix(')')) else {
            continue;
        };
        let bits = u32::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("SAMPO_{name}: {hex}: {e}"));
        out.push((name.to_owned(), bits));
    }
    out
}

/// Every decimal floating literal in `text` (digits, a point, digits, an optional
/// exponent, an optional `f`), outside `//` comments.
fn float_literals(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let b = code.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let starts = b[i].is_ascii_digit() && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'));
            if !starts {
                i += 1;
                continue;
            }
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                // An exponent's sign belongs to the literal.
                i += 1;
                if i < b.len() && (b[i] == b'-' || b[i] == b'+') && matches!(b[i - 1], b'e' | b'E') {
                    i += 1;
                }
            }
            let lit = &code[s..i];
            if lit.contains('.') && !lit.starts_with("0x") {
                out.push(lit.to_owned());
            }
        }
    }
    out
}

#[test]
fn canonical_constants_are_the_same_bits_in_rust_and_cuda() {
    // The transcendental's constants must be the same f32 on both sides. Written as bit
    // patterns on both, no decimal-to-binary conversion (by rustc, NVRTC or the host
    // compiler of the emulator) can make them differ.
    let cuda = header_constants(COMMON_HEADER.1);
    let rust = sampo_kernels::math::CONSTANT_BITS;
    for (name, bits) in rust {
        let found = cuda.iter().find(|(n, _)| n == name);
        assert_eq!(found.map(|(_, b)| *b), Some(bits), "SAMPO_{name}: math.rs has {bits:#010X}, common.cuh {found:?}");
    }
    for (name, bits) in &cuda {
        assert!(rust.iter().any(|(n, _)| n == name), "SAMPO_{name} ({bits:#010X}) is not in math::CONSTANT_BITS");
    }
    assert_eq!(cuda.len(), rust.len());
    // Any decimal literal left in the kernels must be exactly an f32 (0.5f, 127.0f):
    // then its conversion cannot depend on the compiler.
    assert_eq!(float_literals("a = 1.5e-3f * b[2] + 0.5f; // 0.1f"), ["1.5e-3f", "0.5f"]);
    assert!(float_literals(COMMON_HEADER.1).iter().any(|l| l == "127.0f"), "the scan finds the header's literals");
    let texts = std::iter::once(&COMMON_HEADER).chain(SOURCES);
    for (file, text) in texts {
        for lit in float_literals(text) {
            let digits = lit.trim_end_matches(['f', 'F']);
            let v: f64 = digits.parse().unwrap_or_else(|e| panic!("{file}: literal {lit}: {e}"));
            assert_eq!(v as f32 as f64, v, "{file}: {lit} is not exactly an f32; write it as __int_as_float(0x…)");
        }
    }
}
