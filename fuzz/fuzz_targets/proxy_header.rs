//! Arbitrary bytes through the PROXY protocol parser: never panics; a header it accepts
//! is no longer than the input, is complete at exactly that length (every shorter prefix
//! is "need more" or an error, never a different header), and re-encoding its addresses
//! parses back to the same addresses.
#![no_main]

use ballast::proxy_protocol::{encode, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((header, len))) = parse(data) else { return };
    assert!(len <= data.len());
    assert_eq!(parse(&data[..len]).map(|r| r.map(|(_, n)| n)), Ok(Some(len)));
    if len > 0 {
        assert!(!matches!(parse(&data[..len - 1]), Ok(Some(_))));
    }
    if let (Some(src), Some(dst)) = (header.source, header.destination) {
        let again = encode(header.version, src, dst);
        let (back, n) = parse(&again).expect("own encoding parses").expect("complete");
        assert_eq!(n, again.len());
        assert_eq!(back.source.map(|a| a.port()), Some(src.port()));
        assert_eq!(back.destination.map(|a| a.port()), Some(dst.port()));
    }
});
