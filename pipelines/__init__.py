"""Image processing: series to volume, preprocessing, models, and the DICOM writers."""
