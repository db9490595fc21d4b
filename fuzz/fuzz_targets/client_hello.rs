//! Arbitrary bytes through the ClientHello reader (`tls::client_hello::sni`): never panics;
//! a name it reads is visible ASCII in lower case; the shortest prefix it answers for gives
//! the same answer (every shorter one is "incomplete"), and bytes after the input do not
//! change it.
#![no_main]

use ballast::tls::client_hello::{sni, Hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = sni(data);
    let Hello::Sni(name) = &whole else { return };
    if let Some(name) = name {
        assert!(name.bytes().all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()));
    }
    let first = (0..=data.len())
        .map(|cut| sni(&data[..cut]))
        .find(|h| *h != Hello::Incomplete);
    assert_eq!(first.as_ref(), Some(&whole), "the shortest answer is the same");
    let mut more = data.to_vec();
    more.extend_from_slice(&[22, 3, 3, 0, 1, 0xff]);
    assert_eq!(sni(&more), whole);
});
