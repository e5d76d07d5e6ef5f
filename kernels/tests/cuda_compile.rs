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

/// What the determinism contract forbids in PTX: any fused multiply-add (`fma.` — the
/// kernels ask for none, and `--fmad=false` must not contract one), flushing subnormals
/// (`.ftz`) and approximate arithmetic (`.approx`: fast division, square root,
/// transcendentals). Returns each offending line.
fn forbidden_in_ptx(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//"))
        .filter(|l| {
            // The opcode: the first word after a guard predicate (`@%p1`), if any.
            let mut words = l.split_whitespace().skip_while(|w| w.starts_with('@'));
            words.next().is_some_and(|op| op.starts_with("fma.") || op.contains(".ftz") || op.contains(".approx"))
        })
        .collect()
}

#[test]
fn the_ptx_check_catches_what_it_must() {
    let ptx = "\tadd.rn.f32 %f1, %f2, %f3;\n\tfma.rn.f64 %fd1, %fd2, %fd3, %fd4;\n\tex2.approx.ftz.f32 %f4, %f5;\n\
               \tmul.ftz.f32 %f6, %f7, %f8;\n\t@%p1 fma.rn.f32 %f1, %f2, %f3, %f4;\n\t// fma.rn.f32 in a comment\n\tmad.lo.s32 %r1, %r2, %r3, %r4;\n";
    assert_eq!(
        forbidden_in_ptx(ptx),
        [
            "fma.rn.f64 %fd1, %fd2, %fd3, %fd4;",
            "ex2.approx.ftz.f32 %f4, %f5;",
            "mul.ftz.f32 %f6, %f7, %f8;",
            "@%p1 fma.rn.f32 %f1, %f2, %f3, %f4;",
        ]
    );
}

#[test]
fn every_kernel_compiles_without_warnings() {
    let nvrtc = Nvrtc::load(&nvrtc_path()).expect("load NVRTC");
    let version = nvrtc.version().expect("version");
    assert_eq!(version, (13, 0), "scripts/setup.sh installs NVRTC 13.0");
    for arch in ["compute_90", "sm_90"] {
        for (name, src) in SOURCES {
            let out =
                nvrtc.compile(name, src, &[COMMON_HEADER], &compile_options(arch)).unwrap_or_else(|e| panic!("{e}"));
            assert!(out.log.is_empty(), "{name} ({arch}) compiled with warnings:\n{}", out.log);
            assert!(out.ptx.contains(".entry"), "{name}: no kernel entry in the PTX");
            let bad = forbidden_in_ptx(&out.ptx);
            assert!(
                bad.is_empty(),
                "{name} ({arch}): FMA, flush-to-zero or approximate arithmetic in the PTX: {bad:#?}"
            );
        }
    }
}

#[test]
fn a_cubin_for_sm_90_is_an_elf_image_of_every_kernel() {
    use sampo_kernels::cuda::Kernel;
    use sampo_kernels::cuda::driver::{KernelFormat, KernelImage, KernelTarget, compile_kernel};
    let nvrtc = Nvrtc::load(&nvrtc_path()).expect("load NVRTC");
    assert!(nvrtc.supported_archs().expect("archs").contains(&90), "NVRTC 13 builds sm_90 cubins");
    let target = KernelTarget::cubin((9, 0));
    assert_eq!((target.arch.as_str(), target.format), ("sm_90", KernelFormat::Cubin));
    for (name, src) in SOURCES {
        let KernelImage::Cubin(bin) = compile_kernel(&nvrtc, &target, name, src).expect("compile") else {
            panic!("{name}: not a cubin");
        };
        // ELF magic, 64-bit class, little-endian; machine EM_CUDA (190).
        assert_eq!(&bin[..6], b"\x7fELF\x02\x01", "{name}: not a 64-bit little-endian ELF");
        assert_eq!(u16::from_le_bytes([bin[18], bin[19]]), 190, "{name}: not a CUDA ELF");
        // Every kernel the backend looks up in this file is a symbol of it.
        for k in Kernel::ALL.iter().filter(|k| k.file() == *name) {
            let sym = format!("{}\0", k.name());
            assert!(bin.windows(sym.len()).any(|w| w == sym.as_bytes()), "{} not in {name}'s cubin", k.name());
        }
    }
    // A virtual architecture yields no cubin: asking for one is a typed error.
    let virt = KernelTarget { arch: "compute_90".into(), format: KernelFormat::Cubin };
    let err = compile_kernel(&nvrtc, &virt, SOURCES[0].0, SOURCES[0].1).expect_err("no cubin for compute_90");
    assert!(err.to_string().contains("no cubin"), "{err}");
}

#[test]
fn the_target_is_a_cubin_and_ptx_only_for_a_driver_as_new_as_nvrtc() {
    use sampo_kernels::cuda::driver::{KernelFormat, choose_target};
    let archs = [75, 80, 86, 89, 90, 100, 120];
    // A CUDA 12.4 driver and NVRTC 13.0 on a Hopper: a cubin, which it loads (PTX from
    // NVRTC 13 it would refuse).
    let t = choose_target((9, 0), (13, 0), &archs, 12040).expect("cubin");
    assert_eq!((t.arch.as_str(), t.format), ("sm_90", KernelFormat::Cubin));
    // A device this NVRTC does not know: PTX for the newest one below it, only when the
    // driver can JIT NVRTC's PTX.
    let t = choose_target((12, 2), (13, 0), &archs, 13000).expect("ptx");
    assert_eq!((t.arch.as_str(), t.format), ("compute_120", KernelFormat::Ptx));
    let err = choose_target((12, 2), (13, 0), &archs, 12080).expect_err("driver older than NVRTC");
    assert!(err.to_string().contains("CUDA 12.8") && err.to_string().contains("execution.nvrtc"), "{err}");
    let err = choose_target((7, 0), (13, 0), &archs, 13000).expect_err("older than every supported arch");
    assert!(err.to_string().contains("sm_70"), "{err}");
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
fn kernels_are_cached_by_source_architecture_and_versions_and_name_every_kernel() {
    use sampo_kernels::cuda::Kernel;
    use sampo_kernels::cuda::driver::{KernelFormat, KernelImage, KernelTarget, kernel_images};
    let nvrtc = Nvrtc::load(&nvrtc_path()).expect("load NVRTC");
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Some(dir.path());
    let sm90 = KernelTarget::cubin((9, 0));
    let (files, first) = kernel_images(&nvrtc, &sm90, 13000, cache).expect("compile");
    assert_eq!((first.compiled, first.cached, first.format), (SOURCES.len(), 0, KernelFormat::Cubin), "{first:?}");
    assert_eq!((first.nvrtc.as_str(), first.driver), ("13.0", 13000));
    assert!(files.iter().all(|f| matches!(&f.image, KernelImage::Cubin(b) if b.starts_with(b"\x7fELF"))));
    let (again, second) = kernel_images(&nvrtc, &sm90, 13000, cache).expect("from cache");
    assert_eq!((second.compiled, second.cached), (0, SOURCES.len()), "{second:?}");
    assert_eq!(first.cache_key, second.cache_key);
    assert!(files.iter().zip(&again).all(|(a, b)| a.image == b.image && b.cached));
    // Another driver version is another entry: nothing made for one is handed to another.
    let (_, newer) = kernel_images(&nvrtc, &sm90, 13010, cache).expect("compile for a newer driver");
    assert_eq!(newer.compiled, SOURCES.len());
    assert_ne!(newer.cache_key, first.cache_key);
    // As is another architecture, and PTX (every kernel an entry of its file).
    let ptx = KernelTarget { arch: "compute_90".into(), format: KernelFormat::Ptx };
    let (files, other) = kernel_images(&nvrtc, &ptx, 13000, cache).expect("compile PTX");
    assert_eq!(other.compiled, SOURCES.len());
    for k in Kernel::ALL {
        let f = files.iter().find(|f| f.name == k.file()).expect("file compiled");
        let KernelImage::Ptx(text) = &f.image else { panic!("not PTX") };
        assert!(text.contains(&format!(".entry {}(", k.name())), "{} not in {}", k.name(), k.file());
    }
    // A damaged file is compiled again, and no temporary file is left behind.
    let entry = dir.path().join(format!("sm_90-{}", first.cache_key)).join("quant.cu.cubin");
    std::fs::write(&entry, "garbage").expect("damage");
    let (_, third) = kernel_images(&nvrtc, &sm90, 13000, cache).expect("recompile");
    assert_eq!((third.compiled, third.cached), (1, SOURCES.len() - 1), "{third:?}");
    assert!(std::fs::read(&entry).expect("rewritten").starts_with(b"\x7fELF"));
    for d in std::fs::read_dir(dir.path()).expect("cache") {
        for f in std::fs::read_dir(d.expect("entry").path()).expect("folder") {
            let name = f.expect("file").file_name().to_string_lossy().into_owned();
            assert!(!name.ends_with(".tmp"), "temporary file left: {name}");
        }
    }
}

#[test]
fn cache_writes_are_atomic_under_concurrent_writers() {
    use sampo_kernels::cuda::driver::write_atomically;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub").join("k.cubin");
    // Eight writers of different whole contents; a reader only ever sees one of them.
    std::thread::scope(|s| {
        for i in 0..8u8 {
            let path = &path;
            s.spawn(move || {
                for _ in 0..50 {
                    write_atomically(path, &vec![i; 64 * 1024]).expect("write");
                }
            });
        }
        s.spawn(|| {
            for _ in 0..200 {
                if let Ok(b) = std::fs::read(&path) {
                    assert!(b.len() == 64 * 1024 && b.iter().all(|&x| x == b[0]), "a torn cache file");
                }
            }
        });
    });
    let left: Vec<_> =
        std::fs::read_dir(dir.path().join("sub")).expect("dir").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(left, ["k.cubin"], "only the file itself remains");
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

/// Kernel parameters through which a block's threads exchange data across barriers
/// (written by some threads, read by others after `__syncthreads`). On a `__restrict__`
/// pointer the compiler may assume a barrier leaves the memory behind it unchanged and
/// move a load above it: NVRTC 13 did, in `sample_rows` (the selection's slots were read
/// before thread 0 wrote them; every top-k draw was wrong on an H200). The emulator's
/// barrier is an opaque call, so only the declaration can be checked here.
const EXCHANGED_THROUGH_GLOBAL: &[(&str, &[&str])] =
    &[("sample_rows", &["out", "keys", "aux"]), ("attention", &["scores"])];

#[test]
fn memory_exchanged_across_barriers_is_not_restrict() {
    for &(kernel, params) in EXCHANGED_THROUGH_GLOBAL {
        let (_, src) = SOURCES
            .iter()
            .find(|(_, src)| src.contains(&format!("void {kernel}(")))
            .unwrap_or_else(|| panic!("no kernel {kernel}"));
        let start = src.find(&format!("void {kernel}(")).expect("signature");
        let sig = &src[start..start + src[start..].find(')').expect("end of the signature")];
        for &p in params {
            let decl = sig
                .split(',')
                .map(str::trim)
                .find(|d| d.split(|c: char| !c.is_alphanumeric() && c != '_').rfind(|w| !w.is_empty()) == Some(p))
                .unwrap_or_else(|| panic!("{kernel} has no parameter {p}"));
            assert!(
                !decl.contains("__restrict__"),
                "{kernel}: `{decl}` is exchanged across barriers; drop __restrict__"
            );
        }
    }
}
