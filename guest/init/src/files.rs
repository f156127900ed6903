//! File transfer streams: write a file from host data, read a file back to the host.
//!
//! Writes land in a temporary file beside the target and are renamed into place only when
//! complete, so a cancelled or failed transfer never leaves half a file under the name.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nanobox_agent_protocol::pb::{self, frame::Body, ErrorCode, OutputFd};
use nanobox_agent_protocol::INITIAL_WINDOW;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

use crate::agent::{DataBuf, Inbound, StreamTx};

fn io_code(e: &std::io::Error) -> ErrorCode {
    match e.kind() {
        std::io::ErrorKind::NotFound => ErrorCode::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        std::io::ErrorKind::AlreadyExists => ErrorCode::AlreadyExists,
        _ => match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => {
                ErrorCode::ResourceExhausted
            }
            Some(libc::EISDIR) | Some(libc::ENOTDIR) => ErrorCode::InvalidArgument,
            _ => ErrorCode::Internal,
        },
    }
}

/// The request's path if it is absolute and NUL-free; otherwise answers the stream with
/// INVALID_ARGUMENT and returns None.
async fn checked_path(path: &str, stream: &StreamTx) -> Option<PathBuf> {
    let problem = if !path.starts_with('/') {
        format!("path {path:?} is not absolute")
    } else if path.contains('\0') {
        "path contains a NUL byte".to_owned()
    } else {
        return Some(PathBuf::from(path));
    };
    let _ = stream.error(ErrorCode::InvalidArgument, problem).await;
    None
}

pub async fn write(
    req: pb::WriteFileRequest,
    stream: StreamTx,
    mut rx: mpsc::UnboundedReceiver<Inbound>,
) {
    let Some(path) = checked_path(&req.path, &stream).await else {
        return;
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        let _ = stream
            .error(
                ErrorCode::InvalidArgument,
                format!("{} names no file", req.path),
            )
            .await;
        return;
    };
    if req.create_parents {
        if let Err(e) = tokio::fs::create_dir_all(dir).await {
            let _ = stream
                .error(io_code(&e), format!("creating {}: {e}", dir.display()))
                .await;
            return;
        }
    }
    let tmp = dir.join(format!(".{}.nanobox-{}", name.to_string_lossy(), stream.id));
    let mode = if req.mode == 0 {
        0o644
    } else {
        req.mode & 0o7777
    };
    let result = receive_into(&tmp, mode, &stream, &mut rx).await;
    let outcome = match result {
        Ok(bytes) => finish_write(&tmp, &path, mode, req.uid, req.gid)
            .await
            .map(|()| bytes),
        Err(e) => Err(e),
    };
    match outcome {
        Ok(bytes) => {
            let _ = stream
                .send(Body::FileWritten(pb::FileWritten { bytes }))
                .await;
        }
        Err((code, msg)) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            let _ = stream.error(code, msg).await;
        }
    }
}

async fn receive_into(
    tmp: &Path,
    mode: u32,
    stream: &StreamTx,
    rx: &mut mpsc::UnboundedReceiver<Inbound>,
) -> Result<u64, (ErrorCode, String)> {
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .await
        .map_err(|e| (io_code(&e), format!("creating {}: {e}", tmp.display())))?;
    let mut total = 0u64;
    loop {
        match rx.recv().await {
            Some(Inbound::Data(data)) => {
                file.write_all(&data)
                    .await
                    .map_err(|e| (io_code(&e), format!("writing: {e}")))?;
                total += data.len() as u64;
                stream.grant(data.len()).await;
            }
            Some(Inbound::Eof) => break,
            Some(Inbound::Window(_)) | Some(Inbound::Signal(_)) => {}
            Some(Inbound::Cancel) | None => {
                return Err((ErrorCode::Cancelled, "transfer cancelled".into()));
            }
        }
    }
    file.flush()
        .await
        .map_err(|e| (io_code(&e), format!("writing: {e}")))?;
    Ok(total)
}

async fn finish_write(
    tmp: &Path,
    path: &Path,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<(), (ErrorCode, String)> {
    // The umask applied at create; set the mode the caller asked for exactly.
    tokio::fs::set_permissions(tmp, std::fs::Permissions::from_mode(mode))
        .await
        .map_err(|e| (io_code(&e), format!("chmod: {e}")))?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::lchown(tmp, uid, gid)
            .map_err(|e| (io_code(&e), format!("chown: {e}")))?;
    }
    tokio::fs::rename(tmp, path).await.map_err(|e| {
        (
            io_code(&e),
            format!("renaming into {}: {e}", path.display()),
        )
    })
}

pub async fn read(
    req: pb::ReadFileRequest,
    stream: StreamTx,
    mut rx: mpsc::UnboundedReceiver<Inbound>,
) {
    let Some(path) = checked_path(&req.path, &stream).await else {
        return;
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            let _ = stream
                .error(io_code(&e), format!("{}: {e}", req.path))
                .await;
            return;
        }
    };
    match file.metadata().await {
        Ok(m) if m.is_dir() => {
            let _ = stream
                .error(
                    ErrorCode::InvalidArgument,
                    format!("{} is a directory", req.path),
                )
                .await;
            return;
        }
        _ => {}
    }
    if req.offset > 0 {
        if let Err(e) = file.seek(std::io::SeekFrom::Start(req.offset)).await {
            let _ = stream.error(io_code(&e), format!("seek: {e}")).await;
            return;
        }
    }
    let credit = Arc::new(Semaphore::new(INITIAL_WINDOW as usize));
    let credit_task = {
        let credit = credit.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                match msg {
                    Inbound::Window(n) => credit.add_permits(n as usize),
                    Inbound::Cancel => break,
                    _ => {}
                }
            }
            credit.close();
        })
    };
    let mut remaining = if req.limit == 0 { u64::MAX } else { req.limit };
    let mut total = 0u64;
    let result = loop {
        if remaining == 0 {
            break Ok(());
        }
        let mut buf = DataBuf::new();
        let room = buf.reader().capacity() - buf.reader().len();
        let want = room.min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let n = match (&mut file).take(want as u64).read_buf(buf.reader()).await {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        match credit.acquire_many(n as u32).await {
            Ok(p) => p.forget(),
            Err(_) => {
                credit_task.abort();
                return; // cancelled: the host is not listening any more
            }
        }
        if !stream.send_data(OutputFd::Unspecified as i32, buf).await {
            break Ok(());
        }
        total += n as u64;
        remaining -= n as u64;
    };
    credit_task.abort();
    match result {
        Ok(()) => {
            let _ = stream
                .send(Body::FileEnd(pb::FileEnd { bytes: total }))
                .await;
        }
        Err(e) => {
            let _ = stream
                .error(io_code(&e), format!("reading {}: {e}", req.path))
                .await;
        }
    }
}
