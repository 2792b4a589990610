//! write_file / read_file, done natively so images without a shell work. Writes are atomic:
//! a temp file in the same directory, fsync, chmod, rename.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use supermachine_protocol::agent::{DataChunk, CHUNK_LEN};
use supermachine_protocol::{write_frame, FrameReader};

use crate::listener::AgentStream;

fn proto_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

pub fn write(
    path: &str,
    mode: u32,
    reader: &mut FrameReader<Box<dyn AgentStream>>,
) -> io::Result<()> {
    let dest = Path::new(path);
    if !dest.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{path}: not an absolute path"),
        ));
    }
    let dir = dest.parent().unwrap_or(Path::new("/"));
    let name = dest.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{path}: no file name"))
    })?;
    let tmp = dir.join(format!(
        ".{}.sm-tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    // Read every chunk even after a local failure so the stream stays in step.
    let mut file = File::create(&tmp);
    loop {
        match reader.read::<DataChunk>().map_err(proto_err)? {
            Some(DataChunk::Data(bytes)) => {
                if let Ok(f) = file.as_mut() {
                    if let Err(e) = f.write_all(&bytes) {
                        file = Err(e);
                    }
                }
            }
            Some(DataChunk::End) => break,
            Some(DataChunk::Error { message, .. }) => {
                let _ = fs::remove_file(&tmp);
                return Err(io::Error::other(format!(
                    "host aborted the write: {message}"
                )));
            }
            None => {
                let _ = fs::remove_file(&tmp);
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream ended mid-file",
                ));
            }
        }
    }
    let result = file.and_then(|f| {
        f.sync_all()?;
        f.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
        fs::rename(&tmp, dest)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

pub fn read(path: &str, max_bytes: u64, w: &mut Box<dyn AgentStream>) -> Result<(), String> {
    let send =
        |w: &mut Box<dyn AgentStream>, c: &DataChunk| write_frame(w, c).map_err(|e| e.to_string());
    let opened = File::open(path).and_then(|f| {
        let len = f.metadata()?.len();
        if len > max_bytes {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        Ok(f)
    });
    let mut f = match opened {
        Ok(f) => f,
        Err(e) => {
            return send(
                w,
                &DataChunk::Error {
                    kind: crate::error_kind(&e),
                    message: format!("{path}: {e}"),
                },
            );
        }
    };
    let mut buf = vec![0u8; CHUNK_LEN];
    let mut total = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return send(
                    w,
                    &DataChunk::Error {
                        kind: crate::error_kind(&e),
                        message: format!("{path}: {e}"),
                    },
                )
            }
        };
        if n == 0 {
            return send(w, &DataChunk::End);
        }
        total += n as u64;
        if total > max_bytes {
            let e = io::Error::from_raw_os_error(libc::EFBIG);
            return send(
                w,
                &DataChunk::Error {
                    kind: crate::error_kind(&e),
                    message: format!("{path}: grew past {max_bytes} bytes"),
                },
            );
        }
        send(w, &DataChunk::Data(buf[..n].to_vec()))?;
    }
}
