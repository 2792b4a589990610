//! Guest-side building blocks shared by init (PID 1) and the shim (the guest agent):
//! resolving the image's user, the image's environment, and launching a process with a
//! given identity, working directory and session.

pub mod launch;
pub mod system;
pub mod user;
