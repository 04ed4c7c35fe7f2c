//! GenEval-style compositional reward for ShapeWorld. (Being written.)
