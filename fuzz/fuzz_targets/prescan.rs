//! Fuzz target: the pre-scanner on arbitrary lines. It must never panic; what it reports is
//! a tag at the very start of the line, a space, and a command name inside the line that
//! parses to the name it gave.
#![no_main]

use imap_gateway::proto::prescan::{CommandName, is_tag_char, prescan, tag_of};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    if let Some(p) = prescan(line) {
        let t = p.tag.len();
        assert!(t > 0 && p.tag == &line[..t], "tag is not the line's start");
        assert!(
            p.tag.iter().all(|&b| is_tag_char(b)),
            "tag holds a non-tag byte"
        );
        assert_eq!(line[t], b' ', "no space after the tag");
        assert_eq!(p.name_range.start, t + 1, "name does not follow the space");
        assert!(
            p.name_range.start < p.name_range.end && p.name_range.end <= line.len(),
            "name range {:?} outside the line",
            p.name_range
        );
        assert_eq!(p.name, CommandName::parse(&line[p.name_range.clone()]));
    }
    if let Some(tag) = tag_of(line) {
        assert!(
            !tag.is_empty() && line.starts_with(tag),
            "tag_of is not a prefix"
        );
    }
});
