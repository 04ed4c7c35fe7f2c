//! The ShapeWorld generators vipo pretrains itself: the image DiT and the video DiT.

pub mod dit;
pub mod video_dit;
