//! burn-fabric
