"""Ways of reaching WeCom, behind one contract (`base.Gateway`); `registry.build_gateway` picks one."""
