//! Guests for tests: a hand-assembled 64-bit ELF "kernel" around a few bytes of machine
//! code, which the VMM loads and enters in long mode like a real vmlinux, and where the
//! pvm-test kernel lives.

use std::path::{Path, PathBuf};

/// Writes `dir/name`: an ELF whose only segment is `code`, loaded and entered at 2 MiB.
pub fn tiny_kernel(dir: &Path, name: &str, code: &[u8]) -> std::io::Result<PathBuf> {
    let entry: u64 = 0x20_0000;
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&64u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes());
    elf.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // phnum
    elf.extend_from_slice(&64u16.to_le_bytes());
    elf.extend_from_slice(&0u16.to_le_bytes());
    elf.extend_from_slice(&0u16.to_le_bytes());
    // PT_LOAD, R+X, file offset 0x1000 -> 2 MiB
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.resize(0x1000, 0);
    elf.extend_from_slice(code);
    let p = dir.join(name);
    std::fs::write(&p, elf)?;
    Ok(p)
}

/// The pvm-test kernel (`kernel-config/build.sh --variant pvm-test`, which
/// `scripts/test.sh` runs): `$SUPERMACHINE_PVM_TEST_KERNEL`, else the build's cache under
/// `$SUPERMACHINE_CACHE` or `~/.cache/supermachine`. Panics, saying how to build it, when
/// it is missing.
pub fn pvm_test_kernel() -> PathBuf {
    if let Some(p) = std::env::var_os("SUPERMACHINE_PVM_TEST_KERNEL") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("SUPERMACHINE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/supermachine")
        });
    let k = cache.join("kernel/pvm-test/vmlinux");
    assert!(
        k.is_file(),
        "{} is missing: build it with kernel-config/build.sh --variant pvm-test (scripts/test.sh does)",
        k.display()
    );
    k
}
