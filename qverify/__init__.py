"""qverify: bit-exact verification, attacks, certified training and certification reports for quantized networks."""

__version__ = "0.1.0"
