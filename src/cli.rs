//! The thin command-line layer. (Being written.)
pub fn main() -> i32 {
    0
}
