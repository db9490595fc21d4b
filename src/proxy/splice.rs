//! Moving bytes between two TCP sockets with splice(2) through a pipe: the data never
//! enters userspace. Used by TCP listeners with `splice = true`.
//!
//! Each direction owns a pipe. It fills the pipe from the source socket when the pipe is
//! empty, then drains the pipe into the destination socket; tokio's readiness drives both
//! halves (`try_io` clears readiness on `EAGAIN`). A source at EOF shuts down the
//! destination's write side (half-close passed on), and the other direction carries on.
//! A destination that stays unwritable for `write_timeout` fails the connection, like the
//! userspace path's `TimedStream`.

use std::io;
use std::time::Duration;

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes asked of one splice call: the default pipe capacity.
const CHUNK: usize = 64 * 1024;

/// Moves everything from `from` to `to` until `from` reaches EOF; returns the byte count.
/// `moved` is called after each successful read, for the idle timer.
pub async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    write_timeout: Duration,
    moved: &(dyn Fn() + Sync),
) -> io::Result<u64> {
    let (pipe_out, pipe_in) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut total = 0u64;
    loop {
        // Fill the (empty) pipe from the source.
        let filled = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                rustix::pipe::splice(from, None, &pipe_in, None, CHUNK, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if filled == 0 {
            // EOF from the source: pass the half-close on.
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return Ok(total);
        }
        moved();
        // Drain the pipe into the destination.
        let mut left = filled;
        while left > 0 {
            match tokio::time::timeout(write_timeout, to.writable()).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("peer did not read for {write_timeout:?}"),
                    ))
                }
            }
            match to.try_io(Interest::WRITABLE, || {
                rustix::pipe::splice(&pipe_out, None, to, None, left, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(n) => {
                    left -= n;
                    total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
