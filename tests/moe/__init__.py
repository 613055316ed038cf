"""Tests of the MoE (Lazarus) runtime."""
