"""What the node accepts and sends: the single source for the SCP, the SCU and the conformance statement."""

from __future__ import annotations

import re

from pydicom.uid import (
    JPEG2000,
    UID,
    BreastTomosynthesisImageStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    XRayAngiographicImageStorage,
    XRayRadiofluoroscopicImageStorage,
)

# Image storage SOP classes the C-STORE SCP accepts (PS3.4 Annex B). Stored as received, never transcoded.
IMAGE_STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    BreastTomosynthesisImageStorage,
    PositronEmissionTomographyImageStorage,
    EnhancedPETImageStorage,
    NuclearMedicineImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    XRayAngiographicImageStorage,
    XRayRadiofluoroscopicImageStorage,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
)

# Transfer syntaxes accepted for every SOP class above, in order of preference. pynetdicom accepts the
# first entry of this list that the sender proposed, so compressed syntaxes come first: a sender that
# proposes [JPEG Lossless, Explicit VR LE] for a compressed instance then sends it as it is, and the
# node stores it as received instead of making the sender decompress it.
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

VERIFICATION_SOP_CLASS = UID("1.2.840.10008.1.1")  # Verification SOP Class (PS3.4 Annex A)

# C-STORE response statuses the SCP uses. PS3.4 Table B.2-1 defines the families (A7xx refused: out of
# resources, A9xx error: data set does not match SOP class, Cxxx error: cannot understand) and leaves the
# low byte to the implementation: each refusal below has a code of its own, so a sender's log says which
# check failed. PS3.7 9.1.1.1.9 adds the general statuses, of which the node uses Invalid SOP Instance.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # spool or database unavailable, disk under reserve: peer may retry
# A key UID of the data set (SOP Instance, SOP Class, Series, Study) is missing or not a valid UID
# (PS3.5 9.1). An A9xx code, not 0x0117: the request named a valid instance, but the data set breaks the
# IOD's rule that these attributes hold UIDs, so it cannot be an instance of the SOP class.
STATUS_DATASET_DOES_NOT_MATCH = 0xA900
# The data set's SOP Instance UID differs from the request's Affected SOP Instance UID: storing it would
# acknowledge a UID that was not stored (PS3.4 B.2.2 Success means "this instance is stored").
STATUS_SOP_INSTANCE_MISMATCH = 0xA901
# The data set's SOP Class UID differs from the request's Affected SOP Class UID or from the presentation
# context's abstract syntax (an RT Plan sent in a CT Image Storage context).
STATUS_SOP_CLASS_MISMATCH = 0xA902
# PS3.7 Annex C "Invalid SOP Instance": the request's Affected SOP Instance UID itself violates the UID
# construction rules (PS3.5 9.1), whatever the data set holds. (pynetdicom aborts the association before
# any handler runs when that UID is empty or longer than 64 characters.)
STATUS_INVALID_SOP_INSTANCE = 0x0117
STATUS_CANNOT_UNDERSTAND = 0xC210  # not parseable as a DICOM data set
# 0xC211 is pynetdicom's answer when a handler raises; the node's own refusals never use it.
STATUS_ELEMENT_PAST_END = 0xC212  # an element declares a value length past the end of the data
STATUS_NESTING_TOO_DEEP = 0xC213  # sequences nested deeper than the header reader follows
# Uncompressed transfer syntaxes: the Pixel Data element's declared length is shorter than
# Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated / 8 (checked without decoding).
STATUS_PIXEL_DATA_TOO_SHORT = 0xC214

# PS3.5 9.1: components of digits separated by ".", no empty component, no leading zero in a component of
# more than one digit, at most 64 characters.
UID_MAX_LENGTH = 64
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_valid_uid(value: str) -> bool:
    """True when `value` is a UID by the construction rules of PS3.5 9.1."""
    return len(value) <= UID_MAX_LENGTH and _UID.fullmatch(value) is not None


# A-ASSOCIATE-RJ (PS3.8 Table 9-21): rejected-permanent, DICOM UL service-user, and reason 3 "calling AE
# title not recognised" (not on the allow-list) or 7 "called AE title not recognised" (not this node's).
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
# Rejected-transient, DICOM UL service-provider (presentation), reason 2 "local limit exceeded": a calling
# AE over `dicom.max_associations_per_ae` (receive/guard.py).
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
