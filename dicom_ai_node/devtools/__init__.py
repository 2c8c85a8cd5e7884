"""Development tools: the demo's and the tests' real peers and sample data, never used by the service.

- `ports`: free loopback ports, waiting for a listener
- `node`: the node (`dicom-ai-node serve`) as a subprocess with its own config, spool and database
- `orthanc`: Debian's Orthanc started through orthanc-dev/start-orthanc.sh, with REST helpers
- `stack`: Orthanc wired to a running node (auto-forward in, results back)
- `dcmtk`: DCMTK storescu / storescp
- `datasets`: real images (ch2 brain MR, pyradiomics chest CTs) written as DICOM series
- `synthetic`: small synthetic CT / MR / CR series

Used by `dicom-ai-node demo` (cli_demo.py), tests/ and benchmarks/; nothing else in the package may import
it. The runners need a source checkout (orthanc-dev/, config/rules.yaml; `pip install -e .`), the
DCMTK and Orthanc Debian packages and, for the real data sets, what scripts/bootstrap.sh fetches.
"""
