//! Load generation for any server speaking the seed's line protocol (work in progress).
