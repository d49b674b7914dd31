"""Training scripts for the small models we ship: `tinyalign train NAME` runs NAME.main(argv)."""
