//! Incremental body decoding: the caller feeds whatever bytes have arrived, the decoder says
//! how many it consumed and which of them are body data. It never buffers: a chunk's data is
//! handed on as a range of the caller's input, so a busy connection holds only the caller's
//! buffer, whatever the body's size.
//!
//! Chunked framing is strict (RFC 9112 §7.1): every line ends in CRLF, chunk sizes are hex
//! without sign, prefix or whitespace before them, extensions and trailers are bounded and
//! dropped. Lenient chunk parsing is a known request-smuggling vector (a front end and a
//! back end that disagree on where a chunk ends), and ballast re-frames every body it
//! forwards, so nothing a strict reading refuses could reach a backend anyway.

use std::ops::Range;

use super::Framing;

/// Longest chunk-size line (size, extensions, CRLF).
pub const MAX_CHUNK_LINE: usize = 4096;
/// Extension bytes allowed across one body (hyper's limit too): a flood of tiny chunks
/// with long extensions costs parsing work without carrying data.
pub const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;

/// A body that cannot be decoded. Each names the client's (or backend's) mistake, so the log
/// and the blame go to the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("invalid chunk size")]
    ChunkSize,
    #[error("chunk size line or extensions too long")]
    ChunkLineTooLong,
    #[error("invalid chunk extension")]
    ChunkExtension,
    #[error("chunk data not followed by CRLF")]
    ChunkDataEnd,
    #[error("bare CR or LF in chunked framing")]
    LineEnding,
    #[error("invalid trailer field")]
    Trailer,
    #[error("trailer section too large")]
    TrailersTooLarge,
    #[error("body ended before its declared length")]
    Incomplete,
}

/// What one call to [`BodyDecoder::decode`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Input bytes used up (framing and data); the rest belongs to the next call (or, once
    /// the body is done, to the next message).
    pub consumed: usize,
    /// Body data within `input[..consumed]`; empty when this call only read framing.
    pub data: Range<usize>,
}

/// Decodes one message body.
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
    /// Extension bytes seen so far in this body.
    extensions: usize,
    /// Bytes of the current chunk line, or of the trailer section.
    line: usize,
    max_trailers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    UntilClose,
    /// Reading hex digits; `digits` so far, `size` their value.
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size, before `;` or CR: only whitespace (BWS) may follow.
    SizeWhitespace {
        size: u64,
    },
    /// Inside the extensions of a chunk line.
    Extension {
        size: u64,
        quoted: bool,
        escaped: bool,
    },
    /// A CR ended the chunk line; LF must follow.
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final blank line).
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

impl BodyDecoder {
    /// A decoder for `framing`; `max_trailers` bounds the trailer section (the head limit).
    /// `Empty` and `Tunnel` bodies are done at once (a tunnel is not a body).
    pub fn new(framing: Framing, max_trailers: usize) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Tunnel | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size { size: 0, digits: 0 },
            Framing::UntilClose => State::UntilClose,
        };
        BodyDecoder {
            state,
            extensions: 0,
            line: 0,
            max_trailers,
        }
    }

    /// The body has ended; bytes after it belong to the next message.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Body bytes still to come, when the framing says (a length, or done).
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The sender closed its side: fine for a body that ends at close, a truncated body
    /// otherwise.
    pub fn end_of_input(&mut self) -> Result<(), BodyError> {
        match self.state {
            State::Done => Ok(()),
            State::UntilClose => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(BodyError::Incomplete),
        }
    }

    /// Decodes from the start of `input`. Returns at the end of the input, at the end of
    /// the body, or after one stretch of data (call again with the rest).
    pub fn decode(&mut self, input: &[u8]) -> Result<Decoded, BodyError> {
        let mut at = 0;
        while at < input.len() {
            match self.state {
                State::Done => break,
                State::Length(left) => {
                    let take = clamp(left, input.len() - at);
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length(left)
                    };
                    return Ok(Decoded {
                        consumed: at + take,
                        data: at..at + take,
                    });
                }
                State::UntilClose => {
                    return Ok(Decoded {
                        consumed: input.len(),
                        data: at..input.len(),
                    })
                }
                State::Data(left) => {
                    let take = clamp(left, input.len() - at);
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                    return Ok(Decoded {
                        consumed: at + take,
                        data: at..at + take,
                    });
                }
                _ => {
                    self.step(input[at])?;
                    at += 1;
                }
            }
        }
        Ok(Decoded {
            consumed: at,
            data: at..at,
        })
    }

    /// One byte of chunked framing.
    fn step(&mut self, b: u8) -> Result<(), BodyError> {
        use State::*;
        self.line += 1;
        match self.state {
            Size { .. } | SizeWhitespace { .. } | Extension { .. } | SizeLf { .. }
                if self.line > MAX_CHUNK_LINE =>
            {
                return Err(BodyError::ChunkLineTooLong)
            }
            TrailerStart | TrailerName | TrailerValue | TrailerLf | EndLf
                if self.line > self.max_trailers =>
            {
                return Err(BodyError::TrailersTooLarge)
            }
            _ => {}
        }
        self.state = match (self.state, b) {
            (Size { size, digits }, _) if b.is_ascii_hexdigit() => {
                // 16 digits fill a u64; more are refused even as leading zeros, which no
                // honest sender needs.
                if digits == 16 {
                    return Err(BodyError::ChunkSize);
                }
                let digit = u64::from((b as char).to_digit(16).unwrap_or(0));
                Size {
                    size: (size << 4) | digit,
                    digits: digits + 1,
                }
            }
            (Size { digits: 0, .. }, _) => return Err(BodyError::ChunkSize),
            (Size { size, .. } | SizeWhitespace { size }, b' ' | b'\t') => SizeWhitespace { size },
            (Size { size, .. } | SizeWhitespace { size }, b';') => self.extension(size, false)?,
            (Size { size, .. } | SizeWhitespace { size }, b'\r') => SizeLf { size },
            (Size { .. } | SizeWhitespace { .. }, b'\n') => return Err(BodyError::LineEnding),
            (Size { .. } | SizeWhitespace { .. }, _) => return Err(BodyError::ChunkSize),
            (
                Extension {
                    size,
                    quoted: true,
                    escaped: false,
                },
                b'\\',
            ) => {
                self.count_extension()?;
                Extension {
                    size,
                    quoted: true,
                    escaped: true,
                }
            }
            (Extension { size, quoted, .. }, b'\r') if !quoted => SizeLf { size },
            (Extension { .. }, b'\r' | b'\n') => return Err(BodyError::LineEnding),
            (
                Extension {
                    size,
                    quoted,
                    escaped,
                },
                _,
            ) if b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80 => {
                self.count_extension()?;
                Extension {
                    size,
                    // A quote toggles quoting unless a backslash escaped it.
                    quoted: quoted ^ (b == b'"' && !escaped),
                    escaped: false,
                }
            }
            (Extension { .. }, _) => return Err(BodyError::ChunkExtension),
            (SizeLf { size: 0 }, b'\n') => {
                self.line = 0;
                TrailerStart
            }
            (SizeLf { size }, b'\n') => Data(size),
            (SizeLf { .. }, _) => return Err(BodyError::LineEnding),
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => {
                self.line = 0;
                Size { size: 0, digits: 0 }
            }
            (DataCr | DataLf, _) => return Err(BodyError::ChunkDataEnd),
            (TrailerStart, b'\r') => EndLf,
            (TrailerStart | TrailerName, _) if is_token(b) => TrailerName,
            (TrailerName, b':') => TrailerValue,
            (TrailerStart | TrailerName, _) => return Err(BodyError::Trailer),
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerValue, b'\n') => return Err(BodyError::LineEnding),
            (TrailerValue, _) if b == b'\t' || b >= b' ' && b != 0x7f => TrailerValue,
            (TrailerValue, _) => return Err(BodyError::Trailer),
            (TrailerLf, b'\n') => TrailerStart,
            (EndLf, b'\n') => Done,
            (TrailerLf | EndLf, _) => return Err(BodyError::LineEnding),
            (Length(_) | UntilClose | Data(_) | Done, _) => self.state,
        };
        Ok(())
    }

    fn extension(&mut self, size: u64, quoted: bool) -> Result<State, BodyError> {
        self.count_extension()?;
        Ok(State::Extension {
            size,
            quoted,
            escaped: false,
        })
    }

    fn count_extension(&mut self) -> Result<(), BodyError> {
        self.extensions += 1;
        if self.extensions > MAX_CHUNK_EXTENSIONS {
            return Err(BodyError::ChunkLineTooLong);
        }
        Ok(())
    }
}

fn clamp(left: u64, available: usize) -> usize {
    usize::try_from(left).map_or(available, |left| left.min(available))
}

/// RFC 9110 §5.6.2 tchar.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in pieces of `step` bytes; returns the data and the bytes left
    /// after the body.
    fn decode_in_steps(
        framing: Framing,
        input: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, usize), BodyError> {
        let mut d = BodyDecoder::new(framing, 256);
        let mut data = Vec::new();
        let mut at = 0;
        while at < input.len() && !d.is_done() {
            let end = (at + step).min(input.len());
            let mut piece = &input[at..end];
            while !piece.is_empty() && !d.is_done() {
                let out = d.decode(piece)?;
                data.extend_from_slice(&piece[out.data.clone()]);
                at += out.consumed;
                piece = &piece[out.consumed..];
                if out.consumed == 0 {
                    break;
                }
            }
        }
        if !d.is_done() {
            d.end_of_input()?;
        }
        Ok((data, input.len() - at))
    }

    fn chunked(input: &str) -> Result<(Vec<u8>, usize), BodyError> {
        let whole = decode_in_steps(Framing::Chunked, input.as_bytes(), usize::MAX);
        for step in [1, 2, 3, 7] {
            assert_eq!(
                decode_in_steps(Framing::Chunked, input.as_bytes(), step),
                whole,
                "{input:?} in steps of {step}"
            );
        }
        whole
    }

    #[test]
    fn lengths_and_until_close() {
        assert_eq!(
            decode_in_steps(Framing::Length(5), b"helloGET", 2),
            Ok((b"hello".to_vec(), 3))
        );
        assert_eq!(
            decode_in_steps(Framing::Length(9), b"hello", 2),
            Err(BodyError::Incomplete)
        );
        assert_eq!(
            decode_in_steps(Framing::UntilClose, b"all of it", 4),
            Ok((b"all of it".to_vec(), 0))
        );
        assert!(BodyDecoder::new(Framing::Empty, 0).is_done());
        assert!(BodyDecoder::new(Framing::Length(0), 0).is_done());
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(
            chunked("5\r\nhello\r\n0\r\n\r\n"),
            Ok((b"hello".to_vec(), 0))
        );
        assert_eq!(
            chunked("3\r\nabc\r\nA\r\n0123456789\r\n0\r\n\r\nnext"),
            Ok((b"abc0123456789".to_vec(), 4))
        );
        assert_eq!(chunked("0\r\n\r\n"), Ok((Vec::new(), 0)));
        assert_eq!(
            chunked("00000003\r\nabc\r\n0\r\n\r\n"),
            Ok((b"abc".to_vec(), 0))
        );
        assert_eq!(
            chunked("f\r\n0123456789abcde\r\n0\r\n\r\n")
                .unwrap()
                .0
                .len(),
            15
        );
        // Whitespace before extensions (BWS) and extensions, quoted too.
        assert_eq!(
            chunked("3 ;a=1;b=\"x;\\\"y\"\r\nabc\r\n0;last\r\n\r\n"),
            Ok((b"abc".to_vec(), 0))
        );
        // Trailers are read and dropped.
        assert_eq!(
            chunked("1\r\nx\r\n0\r\nX-Sum: 1\r\nX-B:\r\n\r\nrest"),
            Ok((b"x".to_vec(), 4))
        );
    }

    #[test]
    fn chunk_size_limits() {
        assert_eq!(chunked("\r\n").unwrap_err(), BodyError::ChunkSize);
        assert_eq!(chunked(" 5\r\n").unwrap_err(), BodyError::ChunkSize);
        assert_eq!(chunked("+5\r\n").unwrap_err(), BodyError::ChunkSize);
        assert_eq!(chunked("0x5\r\n").unwrap_err(), BodyError::ChunkSize);
        assert_eq!(chunked("5 5\r\n").unwrap_err(), BodyError::ChunkSize);
        assert_eq!(chunked(";a\r\n").unwrap_err(), BodyError::ChunkSize);
        assert_eq!(chunked("g\r\n").unwrap_err(), BodyError::ChunkSize);
        // 16 hex digits is the most: a u64; a 17th (even a leading zero) is refused.
        let max = chunked("ffffffffffffffff\r\nab");
        assert_eq!(max, Err(BodyError::Incomplete));
        assert_eq!(
            chunked("10000000000000000\r\n").unwrap_err(),
            BodyError::ChunkSize
        );
        assert_eq!(
            chunked("00000000000000001\r\n").unwrap_err(),
            BodyError::ChunkSize
        );
        // Extension limits: one line, and all extensions of a body.
        let long_ext = format!("1;{}\r\nx\r\n0\r\n\r\n", "a".repeat(MAX_CHUNK_LINE));
        assert_eq!(chunked(&long_ext).unwrap_err(), BodyError::ChunkLineTooLong);
        let ext = format!("1;{}\r\nx\r\n", "a".repeat(1000));
        let many = ext.repeat(17) + "0\r\n\r\n";
        assert_eq!(chunked(&many).unwrap_err(), BodyError::ChunkLineTooLong);
        assert_eq!(
            chunked(&(ext.repeat(16) + "0\r\n\r\n")).unwrap().0.len(),
            16
        );
        // Control characters in extensions.
        assert_eq!(
            chunked("1;a\x00\r\nx\r\n0\r\n\r\n").unwrap_err(),
            BodyError::ChunkExtension
        );
    }

    #[test]
    fn chunked_line_endings_are_strict() {
        assert_eq!(
            chunked("5\nhello\r\n0\r\n\r\n").unwrap_err(),
            BodyError::LineEnding
        );
        assert_eq!(
            chunked("5\rhello\r\n0\r\n\r\n").unwrap_err(),
            BodyError::LineEnding
        );
        assert_eq!(
            chunked("5;a\nhello\r\n").unwrap_err(),
            BodyError::LineEnding
        );
        assert_eq!(
            chunked("5\r\nhello\n0\r\n\r\n").unwrap_err(),
            BodyError::ChunkDataEnd
        );
        assert_eq!(
            chunked("5\r\nhelloX\r\n").unwrap_err(),
            BodyError::ChunkDataEnd
        );
        assert_eq!(
            chunked("5\r\nhello\r\r\n").unwrap_err(),
            BodyError::ChunkDataEnd
        );
        assert_eq!(chunked("0\r\n\n").unwrap_err(), BodyError::Trailer);
        assert_eq!(
            chunked("0\r\nX: 1\n\r\n").unwrap_err(),
            BodyError::LineEnding
        );
        assert_eq!(chunked("0\r\n\r\r").unwrap_err(), BodyError::LineEnding);
    }

    #[test]
    fn trailers_are_checked_and_bounded() {
        assert_eq!(chunked("0\r\n: 1\r\n\r\n").unwrap_err(), BodyError::Trailer);
        assert_eq!(
            chunked("0\r\nX A: 1\r\n\r\n").unwrap_err(),
            BodyError::Trailer
        );
        assert_eq!(
            chunked("0\r\nX: 1\r\n 2\r\n\r\n").unwrap_err(),
            BodyError::Trailer
        );
        assert_eq!(
            chunked("0\r\nX: 1\x7f\r\n\r\n").unwrap_err(),
            BodyError::Trailer
        );
        let big = format!("0\r\nX: {}\r\n\r\n", "a".repeat(300));
        assert_eq!(chunked(&big).unwrap_err(), BodyError::TrailersTooLarge);
    }

    #[test]
    fn a_body_cut_short_is_incomplete() {
        for cut in [
            "5\r\nhel",
            "5\r\nhello",
            "5\r\nhello\r\n",
            "0\r\n",
            "0\r\nX: 1\r\n",
            "5",
        ] {
            assert_eq!(chunked(cut).unwrap_err(), BodyError::Incomplete, "{cut:?}");
        }
    }
}
