"""Benchmarks: `tinyalign bench NAME --out DIR` runs NAME.main(argv), writing DIR/NAME.json and DIR/NAME.png."""
