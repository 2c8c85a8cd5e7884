"""What the node accepts and sends: the single source for the SCP, the SCU and the conformance statement."""

from __future__ import annotations

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

# C-STORE response statuses the SCP uses (PS3.4 Table B.2-1; PS3.7 C.4.2.1.4).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # spool or database unavailable, disk under reserve: peer may retry
STATUS_DATASET_DOES_NOT_MATCH = 0xA900  # required UIDs missing
STATUS_CANNOT_UNDERSTAND = 0xC210  # unreadable dataset

# A-ASSOCIATE-RJ for an unknown calling AE: rejected-permanent, service-user, calling AE not recognised.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
