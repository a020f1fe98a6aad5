"""Python stubs for the part of juzibot's `wechaty.Puppet` gRPC service that wecast uses.

`puppet_pb2.py` and `puppet_pb2_grpc.py` are generated from `puppet.proto` by `generate.py`; do not edit
them by hand.
"""
